//! Protocol 1.1, faults resolved by the guest kernel (`docs/protocol.md`
//! section 15): layouts built by hand from the tables, every rejection with
//! its status, the kernel reply offsets, and properties over random input.

// Test code: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::*;
use guest_proto::capset::{Capset, Features, VERSION_MINOR};
use guest_proto::command::DecodeLimits;
use guest_proto::header::{NO_REPLY, ReplySlot, RequestHeader};
use guest_proto::opcode::{Command, reply_len};
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::svm::{
    FAULT_RING_STATE_OFFSET, GpaRegion, KERNEL_EVENT_RING, KERNEL_REPLY, KERNEL_RING, RingState,
    SvmAttach, SvmAttachReply, kernel_reply_offset, kernel_reply_slot,
};
use guest_proto::writer::RequestWriter;
use guest_proto::*;
use proptest::prelude::*;

/// A valid `SVM_ATTACH`: a 1024-record ring at 0x10_0000, one page of
/// replies at 0x20_0000, reply into slot 0 of the new region.
fn attach_bytes() -> Vec<u8> {
    let mut b = request(0x0050, 56, 3, 0x8000_0000);
    w64(&mut b, 24, 0x10_0000);
    w64(&mut b, 32, 128 + 32 * 1024);
    w64(&mut b, 40, 0x20_0000);
    w64(&mut b, 48, 4096);
    b
}

fn with(mut b: Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    f(&mut b);
    b
}

#[test]
fn numbers_of_version_1_1() {
    assert_eq!(Command::SvmAttach.as_u32(), 0x0050);
    assert_eq!(Command::SvmDetach.as_u32(), 0x0051);
    assert_eq!(Command::from_u32(0x0050), Some(Command::SvmAttach));
    assert_eq!(Command::from_u32(0x0051), Some(Command::SvmDetach));
    assert_eq!(Command::from_u32(0x0052), None);
    assert_eq!((reply_len(0x0050), reply_len(0x0051)), (24, 16));
    assert_eq!(Status::from_u32(17), Some(Status::Permission));
    assert_eq!(Status::Permission.as_u32(), 17);
    assert_eq!(Features::KERNEL_SVM.bits(), 1 << 4);
    assert!(Features::ALL.contains(Features::KERNEL_SVM));
    assert_eq!(VERSION_MINOR, 1);
    assert_eq!((KERNEL_RING, KERNEL_EVENT_RING), (63, 62));
    assert_eq!(KERNEL_REPLY, 1 << 31);
    assert_eq!(FAULT_RING_STATE_OFFSET, 16);
    assert_eq!(RingState::Attached as u32, 1);
    assert_eq!(RingState::Detached as u32, 2);
    // The capset says 1.1 and KERNEL_SVM at the documented places.
    let b = Capset::default().encode();
    assert_eq!(u16::from_le_bytes([b[6], b[7]]), 1);
    assert_eq!(
        u32::from_le_bytes(b[12..16].try_into().unwrap()) & (1 << 4),
        1 << 4
    );
}

#[test]
fn svm_attach_request_layout() {
    let b = attach_bytes();
    let want = SvmAttach {
        fault_ring: GpaRegion {
            gpa: GuestPhysAddr(0x10_0000),
            size: 128 + 32 * 1024,
        },
        reply: GpaRegion {
            gpa: GuestPhysAddr(0x20_0000),
            size: 4096,
        },
    };
    let req = Request::decode(&b).unwrap();
    assert_eq!(req, Request::SvmAttach(want));
    assert_eq!(req.command(), Command::SvmAttach);
    assert_eq!(want.fault_ring_layout().unwrap().capacity(), 1024);
    let mut out = Vec::new();
    req.encode(3, 0x8000_0000, &mut out).unwrap();
    assert_eq!(out, b);
    assert_eq!(SvmAttach::reply_region_of(&b), Some(want.reply));

    let d = request(0x0051, 16, 4, 0x8000_0040);
    assert_eq!(Request::decode(&d).unwrap(), Request::SvmDetach);
    let mut out = Vec::new();
    Request::SvmDetach.encode(4, 0x8000_0040, &mut out).unwrap();
    assert_eq!(out, d);
}

#[test]
fn svm_replies_layout() {
    let mut b = vec![0u8; 24];
    w32(&mut b, 0, 3);
    w32(&mut b, 4, 0);
    w32(&mut b, 8, 24);
    w32(&mut b, 12, 0x0050);
    w32(&mut b, 16, 1024);
    let reply = Reply {
        seqno: 3,
        status: Status::Ok,
        payload: ReplyPayload::SvmAttach(SvmAttachReply {
            fault_ring_capacity: 1024,
        }),
    };
    assert_eq!(Reply::decode(&b), Ok(reply));
    assert_eq!(reply.encode().as_bytes(), &b[..]);
    // The reserved word must be zero.
    let mut bad = b.clone();
    w32(&mut bad, 20, 1);
    assert_eq!(
        Reply::decode(&bad),
        Err(DecodeError::ReservedNotZero { field: "reserved" })
    );

    let mut d = vec![0u8; 16];
    w32(&mut d, 0, 4);
    w32(&mut d, 4, 17);
    w32(&mut d, 8, 16);
    w32(&mut d, 12, 0x0051);
    let reply = Reply {
        seqno: 4,
        status: Status::Permission,
        payload: ReplyPayload::SvmDetach,
    };
    assert_eq!(Reply::decode(&d), Ok(reply));
    assert_eq!(reply.encode().as_bytes(), &d[..]);
    assert_eq!(
        Reply::error(9, 0x0050, Status::Permission).encode().len(),
        24
    );
}

#[test]
fn svm_attach_rejections() {
    let limits = DecodeLimits {
        max_fault_ring_records: 4096,
        ..DecodeLimits::PROTOCOL
    };
    let cases: Vec<(&str, Vec<u8>, DecodeError, Status)> = vec![
        (
            "too short",
            with(attach_bytes(), |b| {
                b.truncate(48);
                w32(b, 4, 48);
            }),
            DecodeError::WrongLength {
                expected: 56,
                actual: 48,
            },
            Status::Malformed,
        ),
        (
            "too long",
            with(attach_bytes(), |b| {
                b.resize(64, 0);
                w32(b, 4, 64);
            }),
            DecodeError::WrongLength {
                expected: 56,
                actual: 64,
            },
            Status::Malformed,
        ),
        (
            "flags",
            with(attach_bytes(), |b| w32(b, 16, 1)),
            DecodeError::ReservedNotZero { field: "flags" },
            Status::Malformed,
        ),
        (
            "reserved",
            with(attach_bytes(), |b| w32(b, 20, 1)),
            DecodeError::ReservedNotZero { field: "reserved" },
            Status::Malformed,
        ),
        (
            "ring not page-aligned",
            with(attach_bytes(), |b| w64(b, 24, 0x10_0040)),
            DecodeError::Misaligned {
                field: "fault_ring.gpa",
                value: 0x10_0040,
            },
            Status::Misaligned,
        ),
        (
            "reply not page-aligned",
            with(attach_bytes(), |b| w64(b, 40, 0x20_0008)),
            DecodeError::Misaligned {
                field: "reply.gpa",
                value: 0x20_0008,
            },
            Status::Misaligned,
        ),
        (
            "ring capacity not a power of two",
            with(attach_bytes(), |b| w64(b, 32, 128 + 32 * 100)),
            DecodeError::InvalidValue {
                field: "fault_ring.size",
                value: 128 + 32 * 100,
            },
            Status::InvalidArgument,
        ),
        (
            "ring below 16 records",
            with(attach_bytes(), |b| w64(b, 32, 128 + 32 * 8)),
            DecodeError::InvalidValue {
                field: "fault_ring.size",
                value: 128 + 32 * 8,
            },
            Status::InvalidArgument,
        ),
        (
            "ring above the device's limit",
            with(attach_bytes(), |b| w64(b, 32, 128 + 32 * 8192)),
            DecodeError::CountTooLarge {
                field: "fault ring capacity",
                count: 8192,
                max: 4096,
            },
            Status::InvalidArgument,
        ),
        (
            "reply size not a multiple of 8",
            with(attach_bytes(), |b| w64(b, 48, 4092)),
            DecodeError::Misaligned {
                field: "reply.size",
                value: 4092,
            },
            Status::Misaligned,
        ),
        (
            "reply too small",
            with(attach_bytes(), |b| w64(b, 48, 56)),
            DecodeError::InvalidValue {
                field: "reply.size",
                value: 56,
            },
            Status::InvalidArgument,
        ),
        (
            "reply above 1 MiB",
            with(attach_bytes(), |b| w64(b, 48, (1 << 20) + 8)),
            DecodeError::InvalidValue {
                field: "reply.size",
                value: (1 << 20) + 8,
            },
            Status::InvalidArgument,
        ),
        (
            "ring wraps",
            with(attach_bytes(), |b| w64(b, 24, u64::MAX - 0xfff)),
            DecodeError::Overflow {
                field: "fault_ring.gpa",
            },
            Status::OutOfRange,
        ),
        (
            "reply wraps",
            with(attach_bytes(), |b| w64(b, 40, u64::MAX - 0xfff)),
            DecodeError::Overflow { field: "reply.gpa" },
            Status::OutOfRange,
        ),
        (
            "regions overlap",
            with(attach_bytes(), |b| w64(b, 40, 0x10_8000)),
            DecodeError::Overlap {
                first: "fault_ring",
                second: "reply",
            },
            Status::InvalidArgument,
        ),
        (
            "SVM_DETACH with payload",
            request(0x0051, 24, 1, NO_REPLY),
            DecodeError::WrongLength {
                expected: 16,
                actual: 24,
            },
            Status::Malformed,
        ),
    ];
    for (name, bytes, error, status) in cases {
        assert_eq!(
            Request::decode_with(&bytes, &limits).map(|_| ()),
            Err(error),
            "case {name}"
        );
        assert_eq!(error.status(), status, "status of case {name}");
    }
    // The reply region of a failed attach is still known when it alone is
    // valid, and unknown when it is not.
    let ring_bad = with(attach_bytes(), |b| w64(b, 32, 7));
    assert!(SvmAttach::reply_region_of(&ring_bad).is_some());
    let reply_bad = with(attach_bytes(), |b| w64(b, 48, 4));
    assert_eq!(SvmAttach::reply_region_of(&reply_bad), None);
    let reply_unaligned = with(attach_bytes(), |b| w64(b, 40, 0x20_0010));
    assert_eq!(SvmAttach::reply_region_of(&reply_unaligned), None);
    assert_eq!(SvmAttach::reply_region_of(&request(0x0051, 16, 1, 0)), None);
}

#[test]
fn kernel_reply_slots_follow_the_reply_buffer_rules() {
    let h = |cmd, reply_off| RequestHeader {
        cmd,
        len: 16,
        seqno: 1,
        reply_off,
    };
    // VM_BIND's 32-byte reply at the last place that holds it.
    assert_eq!(
        kernel_reply_slot(&h(0x0010, KERNEL_REPLY | 4064), 4096),
        Some(Ok(ReplySlot::At {
            offset: 4064,
            len: 32
        }))
    );
    assert!(matches!(
        kernel_reply_slot(&h(0x0010, KERNEL_REPLY | 4072), 4096),
        Some(Err(_))
    ));
    // In 1.0 terms the same offset does not fit any reply buffer.
    assert!(h(0x0010, KERNEL_REPLY | 64).reply_slot(1 << 20).is_err());
    assert_eq!(kernel_reply_slot(&h(0x0010, 64), 4096), None);
    assert_eq!(
        kernel_reply_offset(KERNEL_REPLY | 0x7FFF_FFF8),
        Some(0x7FFF_FFF8)
    );
}

#[test]
fn a_writer_with_the_kernel_flag_tags_every_reply() {
    let mut w = RequestWriter::new(0..256).with_reply_flag(KERNEL_REPLY);
    let t1 = w.push(&Request::DeviceQuery).unwrap();
    let t2 = w.push(&Request::SvmDetach).unwrap();
    let t3 = w.push_no_reply(&Request::SvmDetach).unwrap();
    assert_eq!(
        (t1.reply_off, t2.reply_off, t3.reply_off),
        (Some(0), Some(80), None)
    );
    let b = w.as_bytes();
    let off = |at: usize| u32::from_le_bytes(b[at + 12..at + 16].try_into().unwrap());
    assert_eq!(off(0), KERNEL_REPLY);
    assert_eq!(off(16), KERNEL_REPLY | 80);
    assert_eq!(off(32), NO_REPLY);
}

proptest! {
    /// Any 56-byte SVM_ATTACH either decodes to something that encodes back
    /// to the same bytes, or is refused; never a panic.
    #[test]
    fn svm_attach_decodes_exactly_or_refuses(
        words in prop::array::uniform5(any::<u64>()),
        small in any::<bool>(),
    ) {
        let mut b = request(0x0050, 56, 1, KERNEL_REPLY);
        for (i, w) in words.iter().enumerate() {
            // Sometimes plausible values, so that successes happen too.
            let v = if small { [0, 0x1000_0000, 128 + 32 * 64, 0x2000_0000, 4096][i] ^ (w & 0x3000) } else { *w };
            let at = 16 + 8 * i;
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        if let Ok(Request::SvmAttach(a)) = Request::decode(&b) {
            prop_assert!(a.fault_ring.gpa.is_page_aligned() && a.reply.gpa.is_page_aligned());
            prop_assert!(!a.fault_ring.overlaps(&a.reply));
            prop_assert!(a.fault_ring_layout().is_some());
            let mut out = Vec::new();
            Request::SvmAttach(a).encode(1, KERNEL_REPLY, &mut out).unwrap();
            prop_assert_eq!(out, b);
        }
    }

    /// A kernel reply slot, when there is one, lies inside the region and
    /// is 8-aligned.
    #[test]
    fn kernel_reply_slots_stay_inside(reply_off in any::<u32>(), size in 0u64..(1 << 21), cmd in prop::sample::select(vec![0x0003u32, 0x0010, 0x0050, 0x0051, 0x1234])) {
        let h = RequestHeader { cmd, len: 16, seqno: 1, reply_off };
        match kernel_reply_slot(&h, size) {
            None => prop_assert!(reply_off == NO_REPLY || reply_off & KERNEL_REPLY == 0),
            Some(Ok(ReplySlot::At { offset, len })) => {
                prop_assert_eq!(offset % 8, 0);
                prop_assert!(u64::from(offset) + u64::from(len) <= size);
                prop_assert_eq!(offset | KERNEL_REPLY, reply_off);
            }
            Some(Ok(ReplySlot::None)) => prop_assert!(false, "no-reply slot for a kernel offset"),
            Some(Err(_)) => {}
        }
    }
}
