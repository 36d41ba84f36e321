//! Rejection tables: every way the protocol says a message is wrong, with
//! the exact error variant and the status it maps to.

// Test code: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::*;
use guest_proto::bind::{BindOp, VmBind};
use guest_proto::capset::Capset;
use guest_proto::command::{DecodeLimits, Region, SessionInit};
use guest_proto::error::FramingError;
use guest_proto::error::KernelArgError;
use guest_proto::fault::{FaultRecord, FaultRingLayout};
use guest_proto::reply::Reply;
use guest_proto::signal::SignalSlot;
use guest_proto::stream::{FramingLost, RequestStream};
use guest_proto::writer::RequestWriter;
use guest_proto::*;

/// `(name, request bytes, expected error, expected status)`.
type Case = (&'static str, Vec<u8>, DecodeError, Status);

fn check_requests(cases: Vec<Case>, limits: &DecodeLimits) {
    for (name, bytes, error, status) in cases {
        assert_eq!(
            Request::decode_with(&bytes, limits).map(|_| ()),
            Err(error),
            "case {name}"
        );
        assert_eq!(error.status(), status, "status of case {name}");
    }
}

fn with(mut b: Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    f(&mut b);
    b
}

fn invalid(field: &'static str, value: u64) -> DecodeError {
    DecodeError::InvalidValue { field, value }
}

fn misaligned(field: &'static str, value: u64) -> DecodeError {
    DecodeError::Misaligned { field, value }
}

#[test]
fn the_valid_bases_are_valid() {
    for b in [
        session_init_bytes(),
        map_pages_bytes(),
        dispatch_fill_bytes(),
    ] {
        let req = Request::decode(&b).unwrap();
        if let Request::VmBind(bind) = req {
            assert!(bind.ops().all(|op| op.is_ok()));
        }
    }
}

#[test]
fn generic_request_rejections() {
    let cases: Vec<Case> = vec![
        (
            "unknown command",
            request(0x99, 16, 1, 0),
            DecodeError::UnknownCommand(0x99),
            Status::UnknownCommand,
        ),
        (
            "command 0",
            request(0, 16, 1, 0),
            DecodeError::UnknownCommand(0),
            Status::UnknownCommand,
        ),
        (
            "shorter than a header",
            vec![1, 0, 0, 0, 16, 0, 0, 0],
            DecodeError::TooShort {
                needed: 16,
                actual: 8,
            },
            Status::Malformed,
        ),
        (
            "len below 16",
            with(request(2, 16, 1, 0), |b| w32(b, 4, 8)),
            DecodeError::Framing(FramingError::LenTooSmall { len: 8 }),
            Status::Malformed,
        ),
        (
            "len not a multiple of 8",
            with(request(2, 24, 1, 0), |b| w32(b, 4, 20)),
            DecodeError::Framing(FramingError::LenMisaligned { len: 20 }),
            Status::Malformed,
        ),
        (
            "len past the bytes",
            with(request(2, 16, 1, 0), |b| w32(b, 4, 24)),
            DecodeError::Framing(FramingError::LenPastEnd {
                len: 24,
                remaining: 16,
            }),
            Status::Malformed,
        ),
        (
            "len short of the bytes",
            with(request(2, 24, 1, 0), |b| w32(b, 4, 16)),
            DecodeError::WrongLength {
                expected: 16,
                actual: 24,
            },
            Status::Malformed,
        ),
        (
            "SESSION_DESTROY with payload",
            request(0x0002, 24, 1, 0),
            DecodeError::WrongLength {
                expected: 16,
                actual: 24,
            },
            Status::Malformed,
        ),
        (
            "DEVICE_QUERY with payload",
            request(0x0003, 32, 1, 0),
            DecodeError::WrongLength {
                expected: 16,
                actual: 32,
            },
            Status::Malformed,
        ),
        (
            "QUEUE_CREATE too long",
            request(0x0020, 32, 1, 0),
            DecodeError::WrongLength {
                expected: 24,
                actual: 32,
            },
            Status::Malformed,
        ),
        (
            "QUEUE_DESTROY too short",
            request(0x0021, 16, 1, 0),
            DecodeError::WrongLength {
                expected: 24,
                actual: 16,
            },
            Status::Malformed,
        ),
        (
            "EVENT_ARM with payload",
            request(0x0040, 24, 1, NO_REPLY),
            DecodeError::WrongLength {
                expected: 16,
                actual: 24,
            },
            Status::Malformed,
        ),
        (
            "EVENT_ARM asking for a reply",
            request(0x0040, 16, 1, 0x40),
            invalid("reply_off", 0x40),
            Status::InvalidArgument,
        ),
        (
            "QUEUE_CREATE priority 16",
            with(request(0x0020, 24, 1, 0), |b| w32(b, 16, 16)),
            invalid("priority", 16),
            Status::InvalidArgument,
        ),
        (
            "QUEUE_CREATE priority 2^32-1",
            with(request(0x0020, 24, 1, 0), |b| w32(b, 16, u32::MAX)),
            invalid("priority", u64::from(u32::MAX)),
            Status::InvalidArgument,
        ),
        (
            "QUEUE_CREATE flags",
            with(request(0x0020, 24, 1, 0), |b| w32(b, 20, 1)),
            DecodeError::ReservedNotZero { field: "flags" },
            Status::Malformed,
        ),
        (
            "QUEUE_DESTROY reserved",
            with(request(0x0021, 24, 1, 0), |b| w8(b, 23, 1)),
            DecodeError::ReservedNotZero { field: "reserved" },
            Status::Malformed,
        ),
    ];
    check_requests(cases, &DecodeLimits::PROTOCOL);
}

#[test]
fn session_init_rejections() {
    let base = session_init_bytes;
    let cases: Vec<Case> = vec![
        (
            "major version 2, v1 length",
            with(base(), |b| w16(b, 16, 2)),
            DecodeError::UnsupportedVersion { major: 2 },
            Status::Version,
        ),
        (
            "major version 2, another length",
            with(request(0x0001, 24, 1, 0), |b| w16(b, 16, 2)),
            DecodeError::UnsupportedVersion { major: 2 },
            Status::Version,
        ),
        (
            "wrong length",
            with(request(0x0001, 112, 1, 0), |b| w16(b, 16, 1)),
            DecodeError::WrongLength {
                expected: 104,
                actual: 112,
            },
            Status::Malformed,
        ),
        (
            "flags",
            with(base(), |b| w32(b, 24, 1)),
            DecodeError::ReservedNotZero { field: "flags" },
            Status::Malformed,
        ),
        (
            "profile 0",
            with(base(), |b| w32(b, 20, 0)),
            invalid("profile", 0),
            Status::InvalidArgument,
        ),
        (
            "profile 3",
            with(base(), |b| w32(b, 20, 3)),
            invalid("profile", 3),
            Status::InvalidArgument,
        ),
        (
            "compat with an event ring",
            with(base(), |b| w32(b, 28, 1)),
            invalid("event_ring", 1),
            Status::InvalidArgument,
        ),
        (
            "native without an event ring",
            with(base(), |b| w32(b, 20, 2)),
            invalid("event_ring", 0),
            Status::InvalidArgument,
        ),
        (
            "region reserved",
            with(base(), |b| w32(b, 36, 1)),
            DecodeError::ReservedNotZero {
                field: "reply.reserved",
            },
            Status::Malformed,
        ),
        (
            "region offset not a multiple of 64",
            with(base(), |b| w64(b, 64, 4096 + 32)),
            misaligned("fault_ring.offset", 4096 + 32),
            Status::Misaligned,
        ),
        (
            "region wraps",
            with(base(), |b| w64(b, 80 + 8, u64::MAX - 63)),
            DecodeError::Overflow {
                field: "signals.offset+size",
            },
            Status::OutOfRange,
        ),
        (
            "reply size not a multiple of 8",
            with(base(), |b| w64(b, 48, 100)),
            misaligned("reply.size", 100),
            Status::Misaligned,
        ),
        (
            "reply buffer too small",
            with(base(), |b| w64(b, 48, 56)),
            invalid("reply.size", 56),
            Status::InvalidArgument,
        ),
        (
            "reply buffer too large",
            with(base(), |b| w64(b, 48, (1 << 20) + 8)),
            invalid("reply.size", (1 << 20) + 8),
            Status::InvalidArgument,
        ),
        (
            "fault ring capacity 8",
            with(base(), |b| w64(b, 72, 128 + 32 * 8)),
            invalid("fault_ring.size", 128 + 32 * 8),
            Status::InvalidArgument,
        ),
        (
            "fault ring capacity 24 (not a power of two)",
            with(base(), |b| w64(b, 72, 128 + 32 * 24)),
            invalid("fault_ring.size", 128 + 32 * 24),
            Status::InvalidArgument,
        ),
        (
            "fault ring smaller than its header",
            with(base(), |b| w64(b, 72, 64)),
            invalid("fault_ring.size", 64),
            Status::InvalidArgument,
        ),
        (
            "fault ring size not header + records",
            with(base(), |b| w64(b, 72, 128 + 32 * 16 + 8)),
            invalid("fault_ring.size", 128 + 32 * 16 + 8),
            Status::InvalidArgument,
        ),
        (
            "fault ring capacity 2^32",
            with(base(), |b| w64(b, 72, 128 + 32 * (1 << 32))),
            invalid("fault_ring.size", 128 + 32 * (1 << 32)),
            Status::InvalidArgument,
        ),
        (
            "signal area not a multiple of 32",
            with(base(), |b| w64(b, 96, 48)),
            misaligned("signals.size", 48),
            Status::Misaligned,
        ),
        (
            "empty signal area",
            with(base(), |b| w64(b, 96, 0)),
            DecodeError::Zero {
                field: "signals.size",
            },
            Status::InvalidArgument,
        ),
        (
            "signal area of 2^32 slots",
            with(base(), |b| w64(b, 96, 32 << 32)),
            DecodeError::CountTooLarge {
                field: "signal slots",
                count: 1 << 32,
                max: u64::from(u32::MAX),
            },
            Status::InvalidArgument,
        ),
        (
            "fault ring overlaps the reply buffer",
            with(base(), |b| w64(b, 64, 4032)),
            DecodeError::Overlap {
                first: "reply",
                second: "fault_ring",
            },
            Status::InvalidArgument,
        ),
        (
            "signals overlap the fault ring",
            with(base(), |b| w64(b, 88, 4096 + 576)),
            DecodeError::Overlap {
                first: "fault_ring",
                second: "signals",
            },
            Status::InvalidArgument,
        ),
    ];
    check_requests(cases, &DecodeLimits::PROTOCOL);

    // Adjacent regions and equal ranges in different resources are fine.
    let ok = with(base(), |b| {
        w64(b, 88, 4096 + 640);
        w32(b, 56, 9);
        w64(b, 64, 0);
    });
    assert!(Request::decode(&ok).is_ok());

    // The device's own limits.
    let limits = DecodeLimits {
        max_bind_ops: 1,
        max_fault_ring_records: 16,
        max_signal_slots: 2,
    };
    let cases: Vec<Case> = vec![
        (
            "fault ring above max_fault_ring_records",
            with(base(), |b| w64(b, 72, 128 + 32 * 32)),
            DecodeError::CountTooLarge {
                field: "fault ring capacity",
                count: 32,
                max: 16,
            },
            Status::InvalidArgument,
        ),
        (
            "signal area above max_signal_slots",
            with(base(), |b| w64(b, 96, 32 * 3)),
            DecodeError::CountTooLarge {
                field: "signal slots",
                count: 3,
                max: 2,
            },
            Status::InvalidArgument,
        ),
    ];
    check_requests(cases, &limits);
}

#[test]
fn session_init_reply_region_survives_other_errors() {
    let bad_ring = with(session_init_bytes(), |b| w64(b, 72, 7));
    assert!(Request::decode(&bad_ring).is_err());
    assert_eq!(
        SessionInit::reply_region_of(&bad_ring),
        Some(Region {
            resource: ResourceId(5),
            offset: 0,
            size: 4096
        })
    );
    let bad_reply = with(session_init_bytes(), |b| w64(b, 48, 60));
    assert_eq!(SessionInit::reply_region_of(&bad_reply), None);
    assert_eq!(
        SessionInit::reply_region_of(&request(0x0001, 16, 1, 0)),
        None
    );
    assert_eq!(SessionInit::reply_region_of(&dispatch_fill_bytes()), None);
    // Another major version may lay the request out differently.
    let v2 = with(session_init_bytes(), |b| w16(b, 16, 2));
    assert_eq!(SessionInit::reply_region_of(&v2), None);
}

#[test]
fn vm_bind_request_rejections() {
    let cases: Vec<Case> = vec![
        (
            "no ops",
            vm_bind_bytes(0, 0),
            DecodeError::Zero { field: "op_count" },
            Status::InvalidArgument,
        ),
        (
            "shorter than the fixed part",
            request(0x0010, 16, 1, 0),
            DecodeError::TooShort {
                needed: 24,
                actual: 16,
            },
            Status::Malformed,
        ),
        (
            "op_count says 2, one op there",
            with(map_pages_bytes(), |b| w32(b, 16, 2)),
            DecodeError::CountMismatch {
                field: "op_count/page_count",
                count: 2,
                expected_len: 24 + 80 + 16,
                len: 80,
            },
            Status::Malformed,
        ),
        (
            "page_count says 3, two entries there",
            with(map_pages_bytes(), |b| w32(b, 20, 3)),
            DecodeError::CountMismatch {
                field: "op_count/page_count",
                count: 1,
                expected_len: 24 + 40 + 24,
                len: 80,
            },
            Status::Malformed,
        ),
        (
            "huge counts in a small request",
            with(map_pages_bytes(), |b| {
                w32(b, 16, u32::MAX);
                w32(b, 20, u32::MAX);
            }),
            DecodeError::CountMismatch {
                field: "op_count/page_count",
                count: u32::MAX,
                expected_len: 24 + 48 * u64::from(u32::MAX),
                len: 80,
            },
            Status::Malformed,
        ),
        (
            "misaligned page entry",
            with(map_pages_bytes(), |b| w64(b, 72, 0xB008)),
            misaligned("pages", 0xB008),
            Status::Misaligned,
        ),
        (
            "misaligned page entry no op uses",
            with(vm_bind_bytes(1, 1), |b| {
                bind_op(b, 24, 3, 0, 0x10000, 0x1000, 0, 0);
                w64(b, 64, 1);
            }),
            misaligned("pages", 1),
            Status::Misaligned,
        ),
    ];
    check_requests(cases, &DecodeLimits::PROTOCOL);

    let three_ops = with(vm_bind_bytes(3, 0), |b| {
        for i in 0..3 {
            bind_op(b, 24 + 40 * i, 3, 0, 0x10000, 0x1000, 0, 0);
        }
    });
    let limits = DecodeLimits {
        max_bind_ops: 2,
        ..DecodeLimits::PROTOCOL
    };
    check_requests(
        vec![(
            "op_count above max_bind_ops",
            three_ops.clone(),
            DecodeError::CountTooLarge {
                field: "op_count",
                count: 3,
                max: 2,
            },
            Status::InvalidArgument,
        )],
        &limits,
    );
    assert!(Request::decode(&three_ops).is_ok());
}

/// One op followed by the page entries 0xA000, 0xB000: the op's error.
fn op_error(kind: u32, perms: u32, va: u64, size: u64, resource: u32, offset: u64) -> DecodeError {
    let b = with(vm_bind_bytes(1, 2), |b| {
        bind_op(b, 24, kind, perms, va, size, resource, offset);
        w64(b, 64, 0xA000);
        w64(b, 72, 0xB000);
    });
    let Request::VmBind(bind) = Request::decode(&b).unwrap() else {
        panic!("not a VM_BIND");
    };
    let mut ops = bind.ops();
    let err = ops.next().unwrap().unwrap_err();
    assert!(ops.next().is_none());
    err
}

#[test]
fn bind_op_rejections() {
    const VA: u64 = 0x10000;
    let cases: Vec<(&str, DecodeError, DecodeError, Status)> = vec![
        (
            "kind 0",
            op_error(0, 1, VA, 0x1000, 0, 0),
            invalid("op.kind", 0),
            Status::InvalidArgument,
        ),
        (
            "kind 4",
            op_error(4, 1, VA, 0x1000, 0, 0),
            invalid("op.kind", 4),
            Status::InvalidArgument,
        ),
        (
            "undefined perm bit",
            op_error(1, 8 | 1, VA, 0x1000, 1, 0),
            invalid("op.perms", 9),
            Status::InvalidArgument,
        ),
        (
            "map without perms",
            op_error(1, 0, VA, 0x1000, 1, 0),
            invalid("op.perms", 0),
            Status::InvalidArgument,
        ),
        (
            "map pages without perms",
            op_error(2, 0, VA, 0x1000, 0, 0),
            invalid("op.perms", 0),
            Status::InvalidArgument,
        ),
        (
            "unmap with perms",
            op_error(3, 1, VA, 0x1000, 0, 0),
            invalid("op.perms", 1),
            Status::InvalidArgument,
        ),
        (
            "misaligned va",
            op_error(3, 0, VA + 8, 0x1000, 0, 0),
            misaligned("op.va", VA + 8),
            Status::Misaligned,
        ),
        (
            "misaligned size",
            op_error(3, 0, VA, 0x1800, 0, 0),
            misaligned("op.size", 0x1800),
            Status::Misaligned,
        ),
        (
            "zero size",
            op_error(3, 0, VA, 0, 0, 0),
            DecodeError::Zero { field: "op.size" },
            Status::InvalidArgument,
        ),
        (
            "va + size wraps",
            op_error(3, 0, u64::MAX - 0xFFF, 0x2000, 0, 0),
            DecodeError::Overflow {
                field: "op.va+size",
            },
            Status::OutOfRange,
        ),
        (
            // The end of a range must be representable.
            "va + size ends exactly at 2^64",
            op_error(3, 0, u64::MAX - 0xFFF, 0x1000, 0, 0),
            DecodeError::Overflow {
                field: "op.va+size",
            },
            Status::OutOfRange,
        ),
        (
            "va + size ends one page below 2^64",
            op_error(3, 0, u64::MAX - 0x1FFF, 0x1000, 0, 1),
            invalid("op.offset", 1),
            Status::InvalidArgument,
        ),
        (
            "misaligned resource offset",
            op_error(1, 3, VA, 0x1000, 1, 0x10),
            misaligned("op.offset", 0x10),
            Status::Misaligned,
        ),
        (
            "resource offset + size wraps",
            op_error(1, 3, VA, 0x2000, 1, u64::MAX - 0xFFF),
            DecodeError::Overflow {
                field: "op.offset+size",
            },
            Status::OutOfRange,
        ),
        (
            "map pages with a resource",
            op_error(2, 3, VA, 0x1000, 7, 0),
            invalid("op.resource_id", 7),
            Status::InvalidArgument,
        ),
        (
            "map pages past the page array",
            op_error(2, 3, VA, 0x2000, 0, 1),
            DecodeError::OutOfRange {
                field: "op.offset..+size/4096 (pages)",
            },
            Status::OutOfRange,
        ),
        (
            "map pages more pages than the array",
            op_error(2, 3, VA, 0x3000, 0, 0),
            DecodeError::OutOfRange {
                field: "op.offset..+size/4096 (pages)",
            },
            Status::OutOfRange,
        ),
        (
            "map pages first index 2^64-1",
            op_error(2, 3, VA, 0x1000, 0, u64::MAX),
            DecodeError::OutOfRange {
                field: "op.offset..+size/4096 (pages)",
            },
            Status::OutOfRange,
        ),
        (
            "map pages 2^52 pages",
            op_error(2, 3, 0, 0xFFFF_FFFF_FFFF_F000, 0, 0),
            DecodeError::OutOfRange {
                field: "op.offset..+size/4096 (pages)",
            },
            Status::OutOfRange,
        ),
        (
            "unmap with a resource",
            op_error(3, 0, VA, 0x1000, 1, 0),
            invalid("op.resource_id", 1),
            Status::InvalidArgument,
        ),
        (
            "unmap with an offset",
            op_error(3, 0, VA, 0x1000, 0, 0x1000),
            invalid("op.offset", 0x1000),
            Status::InvalidArgument,
        ),
    ];
    for (name, got, expected, status) in cases {
        assert_eq!(got, expected, "case {name}");
        assert_eq!(expected.status(), status, "status of case {name}");
    }

    // Reserved field.
    let b = with(map_pages_bytes(), |b| w32(b, 24 + 28, 1));
    let Request::VmBind(bind) = Request::decode(&b).unwrap() else {
        panic!("not a VM_BIND");
    };
    let err = bind.ops().next().unwrap().unwrap_err();
    assert_eq!(
        err,
        DecodeError::ReservedNotZero {
            field: "op.reserved"
        }
    );
    assert_eq!(err.status(), Status::Malformed);
}

#[test]
fn first_bad_op_stops_the_batch() {
    let b = with(vm_bind_bytes(3, 0), |b| {
        bind_op(b, 24, 3, 0, 0x10000, 0x1000, 0, 0);
        bind_op(b, 64, 3, 0, 0x10001, 0x1000, 0, 0);
        bind_op(b, 104, 3, 0, 0x20000, 0x1000, 0, 0);
    });
    let Request::VmBind(bind) = Request::decode(&b).unwrap() else {
        panic!("not a VM_BIND");
    };
    let results: Vec<_> = bind.ops().collect();
    assert_eq!(results.len(), 2);
    assert!(results[0].is_ok());
    assert_eq!(results[1], Err(misaligned("op.va", 0x10001)));
    // ops_done is the number of Oks before the error.
    assert_eq!(bind.ops().take_while(Result::is_ok).count(), 1);
}

#[test]
fn range_attr_rejections() {
    let base = |attrs: &[(u32, u64)]| {
        let mut b = request(0x0011, 40 + 16 * attrs.len(), 1, 0);
        w64(&mut b, 16, 0x10000);
        w64(&mut b, 24, 0x1000);
        w32(&mut b, 32, attrs.len() as u32);
        for (i, (t, v)) in attrs.iter().enumerate() {
            w32(&mut b, 40 + 16 * i, *t);
            w64(&mut b, 48 + 16 * i, *v);
        }
        b
    };
    let one = || base(&[(1, 3)]);
    assert!(Request::decode(&one()).is_ok());
    let nine: Vec<(u32, u64)> = vec![(1, 1); 9];
    let cases: Vec<Case> = vec![
        (
            "no attributes",
            base(&[]),
            DecodeError::Zero {
                field: "attr_count",
            },
            Status::InvalidArgument,
        ),
        (
            "nine attributes",
            base(&nine),
            DecodeError::CountTooLarge {
                field: "attr_count",
                count: 9,
                max: 8,
            },
            Status::InvalidArgument,
        ),
        (
            "count says 2, one there",
            with(one(), |b| w32(b, 32, 2)),
            DecodeError::CountMismatch {
                field: "attr_count",
                count: 2,
                expected_len: 72,
                len: 56,
            },
            Status::Malformed,
        ),
        (
            "shorter than the fixed part",
            request(0x0011, 32, 1, 0),
            DecodeError::TooShort {
                needed: 40,
                actual: 32,
            },
            Status::Malformed,
        ),
        (
            "reserved",
            with(one(), |b| w32(b, 36, 1)),
            DecodeError::ReservedNotZero { field: "reserved" },
            Status::Malformed,
        ),
        (
            "attribute reserved",
            with(one(), |b| w32(b, 44, 1)),
            DecodeError::ReservedNotZero {
                field: "attr.reserved",
            },
            Status::Malformed,
        ),
        (
            "misaligned va",
            with(one(), |b| w64(b, 16, 0x10100)),
            misaligned("va", 0x10100),
            Status::Misaligned,
        ),
        (
            "misaligned size",
            with(one(), |b| w64(b, 24, 0x1001)),
            misaligned("size", 0x1001),
            Status::Misaligned,
        ),
        (
            "zero size",
            with(one(), |b| w64(b, 24, 0)),
            DecodeError::Zero { field: "size" },
            Status::InvalidArgument,
        ),
        (
            "range wraps",
            with(one(), |b| w64(b, 24, u64::MAX - 0xFFF)),
            DecodeError::Overflow { field: "va+size" },
            Status::OutOfRange,
        ),
        (
            "attribute type 0",
            base(&[(0, 0)]),
            invalid("attr.type", 0),
            Status::InvalidArgument,
        ),
        (
            "attribute type 5",
            base(&[(5, 0)]),
            invalid("attr.type", 5),
            Status::InvalidArgument,
        ),
        (
            "undefined access bit",
            base(&[(1, 8)]),
            invalid("attr.value", 8),
            Status::InvalidArgument,
        ),
        (
            "access above 32 bits",
            base(&[(1, (1 << 32) | 1)]),
            invalid("attr.value", (1 << 32) | 1),
            Status::InvalidArgument,
        ),
        (
            "fault policy 2",
            base(&[(2, 2)]),
            invalid("attr.value", 2),
            Status::InvalidArgument,
        ),
        (
            "granularity 11",
            base(&[(3, 11)]),
            invalid("attr.value", 11),
            Status::InvalidArgument,
        ),
        (
            "granularity 31",
            base(&[(3, 31)]),
            invalid("attr.value", 31),
            Status::InvalidArgument,
        ),
        (
            "granularity 2^32 + 12",
            base(&[(3, (1 << 32) + 12)]),
            invalid("attr.value", (1 << 32) + 12),
            Status::InvalidArgument,
        ),
        (
            "prefault 2",
            base(&[(4, 2)]),
            invalid("attr.value", 2),
            Status::InvalidArgument,
        ),
        (
            "access twice",
            base(&[(1, 1), (3, 12), (1, 3)]),
            DecodeError::DuplicateAttribute { attr_type: 1 },
            Status::InvalidArgument,
        ),
    ];
    check_requests(cases, &DecodeLimits::PROTOCOL);
}

#[test]
fn dispatch_rejections() {
    let fill = dispatch_fill_bytes;
    let kernel_err = |e| DecodeError::Kernel(e);
    let chase = |head: u64, steps: u64| {
        with(request(0x0022, 64, 1, 0), |b| {
            w32(b, 20, 6);
            w64(b, 40, head);
            w64(b, 48, steps);
            w64(b, 56, 0x9000);
        })
    };
    let copy = |dst: u64, src: u64, size: u64| {
        with(request(0x0022, 64, 1, 0), |b| {
            w32(b, 20, 2);
            w64(b, 40, dst);
            w64(b, 48, src);
            w64(b, 56, size);
        })
    };
    let cases: Vec<Case> = vec![
        (
            "shorter than the fixed part",
            request(0x0022, 32, 1, 0),
            DecodeError::TooShort {
                needed: 40,
                actual: 32,
            },
            Status::Malformed,
        ),
        (
            "kernel 0",
            with(fill(), |b| w32(b, 20, 0)),
            invalid("kernel", 0),
            Status::InvalidArgument,
        ),
        (
            "kernel 7",
            with(fill(), |b| w32(b, 20, 7)),
            invalid("kernel", 7),
            Status::InvalidArgument,
        ),
        (
            "arguments of the wrong size",
            with(fill(), |b| w32(b, 20, 3)),
            DecodeError::WrongLength {
                expected: 72,
                actual: 64,
            },
            Status::Malformed,
        ),
        (
            "undefined flag",
            with(fill(), |b| w32(b, 28, 2)),
            DecodeError::ReservedNotZero { field: "flags" },
            Status::Malformed,
        ),
        (
            "fill reserved",
            with(fill(), |b| w32(b, 60, 1)),
            DecodeError::ReservedNotZero {
                field: "fill.reserved",
            },
            Status::Malformed,
        ),
        (
            "fill misaligned dst",
            with(fill(), |b| w64(b, 40, 0x10002)),
            kernel_err(KernelArgError::Misaligned("dst")),
            Status::Misaligned,
        ),
        (
            "fill zero count",
            with(fill(), |b| w64(b, 48, 0)),
            kernel_err(KernelArgError::BadCount("count")),
            Status::InvalidArgument,
        ),
        (
            "fill count above 2^36",
            with(fill(), |b| w64(b, 48, (1 << 36) + 1)),
            kernel_err(KernelArgError::BadCount("count")),
            Status::InvalidArgument,
        ),
        (
            "fill wraps",
            with(fill(), |b| w64(b, 40, u64::MAX - 15)),
            kernel_err(KernelArgError::Overflow("dst")),
            Status::OutOfRange,
        ),
        (
            "copy onto itself",
            copy(0x10000, 0x10800, 0x1000),
            kernel_err(KernelArgError::Overlap("src")),
            Status::InvalidArgument,
        ),
        (
            "atomic add without counters",
            with(request(0x0022, 72, 1, 0), |b| {
                w32(b, 20, 3);
                w64(b, 40, 0x1000);
                w64(b, 48, 1);
            }),
            kernel_err(KernelArgError::BadCount("num_counters")),
            Status::InvalidArgument,
        ),
        (
            "atomic add reserved",
            with(request(0x0022, 72, 1, 0), |b| {
                w32(b, 20, 3);
                w32(b, 68, 1);
            }),
            DecodeError::ReservedNotZero {
                field: "atomic_add.reserved",
            },
            Status::Malformed,
        ),
        (
            "saxpy reserved",
            with(request(0x0022, 72, 1, 0), |b| {
                w32(b, 20, 4);
                w32(b, 68, 1);
            }),
            DecodeError::ReservedNotZero {
                field: "saxpy.reserved",
            },
            Status::Malformed,
        ),
        (
            "pointer chase misaligned head",
            chase(0x1004, 1),
            kernel_err(KernelArgError::Misaligned("head")),
            Status::Misaligned,
        ),
        (
            "pointer chase too many steps",
            chase(0x1000, (1 << 36) + 1),
            kernel_err(KernelArgError::BadCount("max_steps")),
            Status::InvalidArgument,
        ),
    ];
    check_requests(cases, &DecodeLimits::PROTOCOL);
    // Adjacent copy ranges are fine.
    assert!(Request::decode(&copy(0x10000, 0x11000, 0x1000)).is_ok());
    assert!(Request::decode(&copy(0x11000, 0x10000, 0x1000)).is_ok());
}

#[test]
fn fault_reply_rejections() {
    let base = |n: usize| {
        let mut b = request(0x0030, 24 + 16 * n, 1, 0);
        w32(&mut b, 16, n as u32);
        for i in 0..n {
            w64(&mut b, 24 + 16 * i, i as u64);
            w32(&mut b, 32 + 16 * i, 1);
        }
        b
    };
    assert!(Request::decode(&base(4096)).is_ok());
    let cases: Vec<Case> = vec![
        (
            "no entries",
            base(0),
            DecodeError::Zero { field: "count" },
            Status::InvalidArgument,
        ),
        (
            "4097 entries",
            base(4097),
            DecodeError::CountTooLarge {
                field: "count",
                count: 4097,
                max: 4096,
            },
            Status::InvalidArgument,
        ),
        (
            "count says 3, two there",
            with(base(2), |b| w32(b, 16, 3)),
            DecodeError::CountMismatch {
                field: "count",
                count: 3,
                expected_len: 72,
                len: 56,
            },
            Status::Malformed,
        ),
        (
            "shorter than the fixed part",
            request(0x0030, 16, 1, 0),
            DecodeError::TooShort {
                needed: 24,
                actual: 16,
            },
            Status::Malformed,
        ),
        (
            "reserved",
            with(base(1), |b| w32(b, 20, 1)),
            DecodeError::ReservedNotZero { field: "reserved" },
            Status::Malformed,
        ),
        (
            "outcome 0 in the last entry",
            with(base(3), |b| w32(b, 24 + 32 + 8, 0)),
            invalid("entry.outcome", 0),
            Status::InvalidArgument,
        ),
        (
            "outcome 3",
            with(base(1), |b| w32(b, 32, 3)),
            invalid("entry.outcome", 3),
            Status::InvalidArgument,
        ),
        (
            "entry reserved",
            with(base(2), |b| w32(b, 24 + 16 + 12, 1)),
            DecodeError::ReservedNotZero {
                field: "entry.reserved",
            },
            Status::Malformed,
        ),
    ];
    check_requests(cases, &DecodeLimits::PROTOCOL);
}

#[test]
fn stream_framing_lost_versus_invalid_request() {
    // A valid request, an invalid but well-framed one, a valid one.
    let mut payload = request(0x0002, 16, 1, 0);
    payload.extend(request(0x0099, 24, 2, 16));
    payload.extend(request(0x0003, 16, 3, 32));
    let items: Vec<_> = RequestStream::new(&payload).collect();
    assert_eq!(items.len(), 3);
    let decoded: Vec<_> = items
        .iter()
        .map(|i| i.as_ref().unwrap().decode().map(|r| r.command()))
        .collect();
    assert_eq!(
        decoded,
        [
            Ok(Command::SessionDestroy),
            Err(DecodeError::UnknownCommand(0x99)),
            Ok(Command::DeviceQuery)
        ]
    );

    // Each broken header loses the framing; nothing after it is yielded.
    let tail = request(0x0003, 16, 9, 0);
    let cases: Vec<(&str, Vec<u8>, FramingError)> = vec![
        (
            "len 0",
            with(request(0x0002, 16, 2, 16), |b| w32(b, 4, 0)),
            FramingError::LenTooSmall { len: 0 },
        ),
        (
            "len 8",
            with(request(0x0002, 16, 2, 16), |b| w32(b, 4, 8)),
            FramingError::LenTooSmall { len: 8 },
        ),
        (
            "len 20",
            with(request(0x0002, 24, 2, 16), |b| w32(b, 4, 20)),
            FramingError::LenMisaligned { len: 20 },
        ),
        (
            "len past the end",
            with(request(0x0002, 16, 2, 16), |b| w32(b, 4, 0x10_0000)),
            FramingError::LenPastEnd {
                len: 0x10_0000,
                remaining: 32,
            },
        ),
    ];
    for (name, broken, error) in cases {
        let header = guest_proto::header::RequestHeader::decode(&broken).unwrap();
        let mut payload = request(0x0002, 16, 1, 0);
        payload.extend(&broken);
        payload.extend(&tail);
        let mut it = RequestStream::new(&payload);
        assert!(it.next().unwrap().is_ok(), "{name}");
        let lost = it.next().unwrap().unwrap_err();
        assert_eq!(
            lost,
            FramingLost {
                offset: 16,
                header: Some(header),
                error
            },
            "{name}"
        );
        assert_eq!(lost.status(), Status::Malformed);
        assert!(it.next().is_none(), "{name}");
        assert!(it.next().is_none(), "{name}");
    }

    // A tail too short for a header: framing lost, no header to answer.
    for extra in [1usize, 8, 15] {
        let mut payload = request(0x0002, 16, 1, 0);
        payload.extend(vec![0u8; extra]);
        let items: Vec<_> = RequestStream::new(&payload).collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert_eq!(
            items[1].as_ref().unwrap_err(),
            &FramingLost {
                offset: 16,
                header: None,
                error: FramingError::TruncatedHeader { remaining: extra }
            }
        );
    }

    // An empty payload has no requests.
    assert_eq!(RequestStream::new(&[]).count(), 0);
}

#[test]
fn stream_applies_device_limits() {
    let b = with(vm_bind_bytes(2, 0), |b| {
        bind_op(b, 24, 3, 0, 0x10000, 0x1000, 0, 0);
        bind_op(b, 64, 3, 0, 0x20000, 0x1000, 0, 0);
    });
    let limits = DecodeLimits {
        max_bind_ops: 1,
        ..DecodeLimits::PROTOCOL
    };
    let framed = RequestStream::new(&b)
        .with_limits(limits)
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        framed.decode().map(|_| ()),
        Err(DecodeError::CountTooLarge {
            field: "op_count",
            count: 2,
            max: 1
        })
    );
}

#[test]
fn writer_refuses_what_the_device_would_refuse() {
    let ops = [BindOp::Unmap {
        va: GpuVa(0x10001),
        size: 0x1000,
    }];
    let mut w = RequestWriter::new(0..4096);
    assert_eq!(
        w.push(&Request::VmBind(VmBind::new(&ops))),
        Err(EncodeError::Invalid(misaligned("op.va", 0x10001)))
    );
    assert!(w.is_empty());
    assert_eq!(
        w.push(&Request::VmBind(VmBind::new(&[]))),
        Err(EncodeError::Invalid(DecodeError::Zero {
            field: "op_count"
        }))
    );
}

fn reply_bytes(seqno: u32, status: u32, len: u32, cmd: u32) -> Vec<u8> {
    let mut b = vec![0u8; len.max(16) as usize];
    w32(&mut b, 0, seqno);
    w32(&mut b, 4, status);
    w32(&mut b, 8, len);
    w32(&mut b, 12, cmd);
    b
}

#[test]
fn reply_rejections() {
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        (
            "shorter than a header",
            vec![0u8; 12],
            DecodeError::TooShort {
                needed: 16,
                actual: 12,
            },
        ),
        (
            "undefined status",
            reply_bytes(1, 0x99, 16, 0x0002),
            invalid("status", 0x99),
        ),
        (
            "len not the command's",
            reply_bytes(1, 0, 16, 0x0010),
            DecodeError::WrongLength {
                expected: 32,
                actual: 16,
            },
        ),
        (
            "len of an unknown command",
            reply_bytes(1, 1, 24, 0x0099),
            DecodeError::WrongLength {
                expected: 16,
                actual: 24,
            },
        ),
        (
            "payload cut off",
            reply_bytes(1, 0, 80, 0x0003)[..40].to_vec(),
            DecodeError::TooShort {
                needed: 80,
                actual: 40,
            },
        ),
        (
            "VM_BIND reply reserved",
            with(reply_bytes(1, 0, 32, 0x0010), |b| w32(b, 20, 1)),
            DecodeError::ReservedNotZero { field: "reserved" },
        ),
        (
            "QUEUE_CREATE reply reserved",
            with(reply_bytes(1, 0, 24, 0x0020), |b| w32(b, 20, 1)),
            DecodeError::ReservedNotZero { field: "reserved" },
        ),
    ];
    for (name, bytes, error) in cases {
        assert_eq!(Reply::decode(&bytes), Err(error), "case {name}");
    }
}

#[test]
fn capset_rejections_and_tolerance() {
    let good = Capset::default().encode();
    let cases: Vec<(&str, Vec<u8>, DecodeError, Status)> = vec![
        (
            "short",
            good[..127].to_vec(),
            DecodeError::TooShort {
                needed: 128,
                actual: 127,
            },
            Status::Malformed,
        ),
        (
            "bad magic",
            with(good.to_vec(), |b| w32(b, 0, 0x4C52_4956)),
            DecodeError::BadMagic(0x4C52_4956),
            Status::Version,
        ),
        (
            "major 2",
            with(good.to_vec(), |b| w16(b, 4, 2)),
            DecodeError::UnsupportedVersion { major: 2 },
            Status::Version,
        ),
        (
            "size 64",
            with(good.to_vec(), |b| w32(b, 8, 64)),
            invalid("size", 64),
            Status::InvalidArgument,
        ),
        (
            "size past the bytes",
            with(good.to_vec(), |b| w32(b, 8, 256)),
            DecodeError::TooShort {
                needed: 256,
                actual: 128,
            },
            Status::Malformed,
        ),
    ];
    for (name, bytes, error, status) in cases {
        assert_eq!(Capset::decode(&bytes), Err(error), "case {name}");
        assert_eq!(error.status(), status, "case {name}");
    }

    // A newer minor version: longer payload, unknown feature bits, reserved
    // fields in use. Version 1.1 reads what it knows.
    let mut newer = good.to_vec();
    newer.resize(192, 0xEE);
    w16(&mut newer, 6, 3);
    w32(&mut newer, 8, 192);
    w32(&mut newer, 12, 0xFFFF_FFFF);
    w16(&mut newer, 18, 0xABCD);
    newer[124..128].fill(0x55);
    let capset = Capset::decode(&newer).unwrap();
    assert_eq!(capset.version_minor, 3);
    assert_eq!(capset.features.bits(), 0xFFFF_FFFF);
    assert_eq!(
        Capset {
            version_minor: Capset::default().version_minor,
            features: Capset::default().features,
            ..capset
        },
        Capset::default()
    );
    // A 1.0 device: zeros where 1.1 put the user-queue fields.
    let mut old = good.to_vec();
    w16(&mut old, 6, 0);
    w32(&mut old, 12, 0xF);
    old[116..128].fill(0);
    let capset = Capset::decode(&old).unwrap();
    assert_eq!((capset.user_queue_kinds, capset.max_user_queues), (0, 0));
    assert!(!capset.supports_user_queue(guest_proto::uq::UserQueueKind::Sdma));
}

#[test]
fn fault_record_rejections() {
    let access = || {
        let mut b = vec![0u8; 32];
        w64(&mut b, 0, 1);
        w64(&mut b, 8, 0x10000);
        w32(&mut b, 16, 2);
        w8(&mut b, 20, 1);
        w8(&mut b, 22, 12);
        w32(&mut b, 24, 1);
        b
    };
    let prefault = || {
        let mut b = vec![0u8; 32];
        w64(&mut b, 8, 0x10000);
        w32(&mut b, 16, 0xFFFF_FFFF);
        w8(&mut b, 21, 1);
        w8(&mut b, 22, 12);
        b
    };
    assert!(FaultRecord::decode(&access()).is_ok());
    assert!(FaultRecord::decode(&prefault()).is_ok());
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        (
            "short",
            access()[..31].to_vec(),
            DecodeError::TooShort {
                needed: 32,
                actual: 31,
            },
        ),
        (
            "misaligned va",
            with(access(), |b| w64(b, 8, 0x10010)),
            misaligned("record.va", 0x10010),
        ),
        (
            "granule 11",
            with(access(), |b| w8(b, 22, 11)),
            invalid("record.granule_shift", 11),
        ),
        (
            "granule 31",
            with(access(), |b| w8(b, 22, 31)),
            invalid("record.granule_shift", 31),
        ),
        (
            "undefined flag",
            with(access(), |b| w8(b, 21, 2)),
            invalid("record.flags", 2),
        ),
        (
            "no access",
            with(access(), |b| w8(b, 20, 0)),
            invalid("record.access", 0),
        ),
        (
            "undefined access bit",
            with(access(), |b| w8(b, 20, 0x10)),
            invalid("record.access", 0x10),
        ),
        (
            "nothing merged",
            with(access(), |b| w32(b, 24, 0)),
            DecodeError::Zero {
                field: "record.merged",
            },
        ),
        (
            "access record without a queue",
            with(access(), |b| w32(b, 16, 0xFFFF_FFFF)),
            invalid("record.queue_id", 0xFFFF_FFFF),
        ),
        (
            "reserved byte 23",
            with(access(), |b| w8(b, 23, 1)),
            DecodeError::ReservedNotZero {
                field: "record.reserved23",
            },
        ),
        (
            "reserved word 28",
            with(access(), |b| w32(b, 28, 1)),
            DecodeError::ReservedNotZero {
                field: "record.reserved28",
            },
        ),
        (
            "prefault with a queue",
            with(prefault(), |b| w32(b, 16, 0)),
            invalid("record.queue_id", 0),
        ),
        (
            "prefault with an access",
            with(prefault(), |b| w8(b, 20, 1)),
            invalid("record.access", 1),
        ),
        (
            "prefault with merges",
            with(prefault(), |b| w32(b, 24, 1)),
            invalid("record.merged", 1),
        ),
    ];
    for (name, bytes, error) in cases {
        assert_eq!(FaultRecord::decode(&bytes), Err(error), "case {name}");
    }
}

#[test]
fn fault_ring_shape_rejections() {
    for capacity in [0u32, 1, 8, 15, 24, 100, (1 << 31) + 1, u32::MAX] {
        assert_eq!(FaultRingLayout::new(capacity), None, "capacity {capacity}");
    }
    for size in [0u64, 127, 128, 128 + 32 * 15, 128 + 32 * 16 + 1, u64::MAX] {
        assert_eq!(
            FaultRingLayout::from_size(size, u32::MAX),
            Err(invalid("fault_ring.size", size)),
            "size {size}"
        );
    }
}

#[test]
fn signal_slot_rejections() {
    let mut b = [0u8; 32];
    w32(&mut b, 8, 7);
    assert_eq!(SignalSlot::decode(&b), Err(invalid("signal.status", 7)));
    let mut b = [0u8; 32];
    w32(&mut b, 12, 1);
    assert_eq!(
        SignalSlot::decode(&b),
        Err(DecodeError::ReservedNotZero {
            field: "signal.reserved12"
        })
    );
    let mut b = [0u8; 32];
    w8(&mut b, 31, 1);
    assert_eq!(
        SignalSlot::decode(&b),
        Err(DecodeError::ReservedNotZero {
            field: "signal.reserved24"
        })
    );
    assert_eq!(
        SignalSlot::decode(&[0u8; 16]),
        Err(DecodeError::TooShort {
            needed: 32,
            actual: 16
        })
    );
}

#[test]
fn every_error_variant_maps_to_its_status() {
    use DecodeError as E;
    let table = [
        (
            E::TooShort {
                needed: 1,
                actual: 0,
            },
            Status::Malformed,
        ),
        (
            E::WrongLength {
                expected: 1,
                actual: 0,
            },
            Status::Malformed,
        ),
        (
            E::Framing(FramingError::LenTooSmall { len: 0 }),
            Status::Malformed,
        ),
        (E::UnknownCommand(5), Status::UnknownCommand),
        (E::UnsupportedVersion { major: 0 }, Status::Version),
        (E::BadMagic(0), Status::Version),
        (E::ReservedNotZero { field: "f" }, Status::Malformed),
        (misaligned("f", 1), Status::Misaligned),
        (E::Zero { field: "f" }, Status::InvalidArgument),
        (
            E::CountTooLarge {
                field: "f",
                count: 2,
                max: 1,
            },
            Status::InvalidArgument,
        ),
        (
            E::CountMismatch {
                field: "f",
                count: 1,
                expected_len: 2,
                len: 1,
            },
            Status::Malformed,
        ),
        (E::Overflow { field: "f" }, Status::OutOfRange),
        (E::OutOfRange { field: "f" }, Status::OutOfRange),
        (invalid("f", 1), Status::InvalidArgument),
        (
            E::DuplicateAttribute { attr_type: 1 },
            Status::InvalidArgument,
        ),
        (
            E::Overlap {
                first: "a",
                second: "b",
            },
            Status::InvalidArgument,
        ),
        (
            E::Kernel(KernelArgError::Misaligned("a")),
            Status::Misaligned,
        ),
        (
            E::Kernel(KernelArgError::BadCount("a")),
            Status::InvalidArgument,
        ),
        (E::Kernel(KernelArgError::Overflow("a")), Status::OutOfRange),
        (
            E::Kernel(KernelArgError::Overlap("a")),
            Status::InvalidArgument,
        ),
    ];
    for (error, status) in table {
        assert_eq!(error.status(), status, "{error}");
    }
}
