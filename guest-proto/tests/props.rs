//! Property tests: no decoder entry point panics on any input, whether
//! random bytes, random bytes behind a plausible header, or valid requests
//! with bytes flipped; and every valid request the guest can build reaches
//! the device unchanged.

// Test code: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use guest_proto::attr::{RangeAttr, RangeAttrs};
use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::capset::Capset;
use guest_proto::command::{
    DecodeLimits, Dispatch, Profile, QueueCreate, QueueDestroy, Region, SessionInit,
};
use guest_proto::fault::{
    FaultOutcome, FaultRecord, FaultReply, FaultReplyEntry, FaultRingHeader, FaultRingLayout,
};
use guest_proto::header::{ReplyHeader, RequestHeader};
use guest_proto::reply::Reply;
use guest_proto::signal::SignalSlot;
use guest_proto::stream::RequestStream;
use guest_proto::uq::{UserQueueCreate, UserQueueDestroy, UserQueueKind};
use guest_proto::writer::RequestWriter;
use guest_proto::*;
use proptest::prelude::*;

const CMDS: [u32; 17] = [
    0x0001, 0x0002, 0x0003, 0x0004, 0x0010, 0x0011, 0x0020, 0x0021, 0x0022, 0x0023, 0x0024, 0x0025,
    0x0030, 0x0040, 0x0050, 0x0051, 0x0099,
];

/// Consumes everything a decoded request offers, the way the device would.
fn exercise(req: &Request<'_>) -> usize {
    let mut n = 0;
    match req {
        Request::VmBind(bind) => {
            for op in bind.ops() {
                if let Ok(BindOp::MapPages { pages, .. }) = op {
                    n += pages.iter().count();
                    assert_eq!(pages.len() as u64 * PAGE_SIZE, pages.size());
                }
                n += 1;
            }
            // The iterator stops at the first error.
            let errors = bind.ops().filter(Result::is_err).count();
            assert!(errors <= 1);
        }
        Request::FaultReply(reply) => {
            n += reply.entries().count();
            assert_eq!(n, reply.len());
        }
        Request::SessionInit(init) => {
            assert!(init.fault_ring_layout().is_some());
            assert!(init.signal_slots().is_some());
        }
        Request::Dispatch(d) => {
            assert_eq!(d.kernel.validate(), Ok(()));
        }
        _ => {}
    }
    n
}

/// Runs a payload through the stream as the device does and checks the
/// stream's own invariants.
fn run_stream(payload: &[u8], limits: DecodeLimits) {
    let mut expected_offset = 0;
    let mut lost = false;
    for item in RequestStream::new(payload).with_limits(limits) {
        assert!(!lost, "an item after the framing was lost");
        match item {
            Ok(framed) => {
                assert_eq!(framed.offset, expected_offset);
                assert_eq!(framed.bytes.len(), framed.header.len as usize);
                assert!(framed.bytes.len() >= 16 && framed.bytes.len() % 8 == 0);
                expected_offset += framed.bytes.len();
                match framed.decode() {
                    Ok(req) => {
                        exercise(&req);
                    }
                    Err(e) => {
                        // A framed request never reports a framing error.
                        assert!(!matches!(e, DecodeError::Framing(_)), "{e:?}");
                        let _ = e.status();
                    }
                }
                let _ = framed.header.reply_slot(4096);
            }
            Err(l) => {
                assert_eq!(l.offset, expected_offset);
                assert_eq!(l.status(), Status::Malformed);
                lost = true;
            }
        }
    }
    assert!(expected_offset <= payload.len());
    if !lost {
        assert_eq!(expected_offset, payload.len());
    }
}

/// Random bytes with a plausible header: a known command and a length that
/// frames the body.
fn headed_request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(&CMDS[..]),
        any::<u32>(),
        prop_oneof![Just(NO_REPLY), any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(cmd, seqno, reply_off, mut body)| {
            body.truncate(body.len() / 8 * 8);
            let mut b = RequestHeader {
                cmd,
                len: (16 + body.len()) as u32,
                seqno,
                reply_off,
            }
            .encode()
            .to_vec();
            b.extend(body);
            b
        })
}

/// 32-bit words at the edges of the fields' domains: mostly zero (so
/// reserved fields often pass), small counts and ids, page-sized and
/// misaligned values, the top of the range, and some arbitrary ones. Two of
/// them make a 64-bit field.
fn interesting() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => Just(0u32),
        4 => prop::sample::select(vec![
            1u32, 2, 3, 4, 7, 8, 12, 15, 16, 30, 31, 64, 0x1000, 0x1008, 0x2000, 0x1_0000,
        ]),
        1 => prop::sample::select(vec![0xFFFF_FFFFu32, 0x8000_0000, 0xFFFF_F000, 0x10]),
        1 => any::<u32>(),
    ]
}

/// A request of a known command whose length and counts agree, with every
/// other 4-byte word drawn from [`interesting`]: decoding gets past the
/// framing and count checks and into the field checks.
fn structured_request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(&CMDS[..10]),
        0u32..6,
        0u32..6,
        0u32..8,
        prop::collection::vec(interesting(), 128),
    )
        .prop_map(|(cmd, n1, n2, kernel, words)| {
            let len = match cmd {
                0x0001 => 104,
                0x0010 => 24 + 40 * n1 + 8 * n2,
                0x0011 => 40 + 16 * n1,
                0x0020 | 0x0021 => 24,
                0x0022 => 40 + kernel::args_len_of(kernel).unwrap_or(24) as u32,
                0x0030 => 24 + 16 * n1,
                0x0050 => 56,
                _ => 16,
            };
            let mut b = vec![0u8; len as usize];
            for (i, w) in words.iter().enumerate() {
                let off = 16 + 4 * i;
                if off + 4 > b.len() {
                    break;
                }
                b[off..off + 4].copy_from_slice(&w.to_le_bytes());
            }
            let header = RequestHeader {
                cmd,
                len,
                seqno: 1,
                reply_off: if cmd == 0x0040 { NO_REPLY } else { 0 },
            };
            b[..16].copy_from_slice(&header.encode());
            let mut put = |off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
            match cmd {
                0x0001 => put(16, 1),
                0x0010 => {
                    put(16, n1);
                    put(20, n2);
                }
                0x0011 => put(32, n1),
                0x0022 => put(20, kernel),
                0x0030 => put(16, n1),
                _ => {}
            }
            b
        })
}

fn page_va() -> impl Strategy<Value = GpuVa> {
    (0u64..1 << 40).prop_map(|p| GpuVa(p << 12))
}

fn gpa() -> impl Strategy<Value = GuestPhysAddr> {
    (0u64..1 << 40).prop_map(|p| GuestPhysAddr(p << 12))
}

fn perms() -> impl Strategy<Value = Perms> {
    (1u32..=7).prop_map(|b| Perms::from_bits(b).unwrap())
}

fn size_pages() -> impl Strategy<Value = u64> {
    (1u64..1 << 20).prop_map(|n| n << 12)
}

/// An owned bind op; `MapPages` owns its pages.
#[derive(Clone, Debug)]
enum OwnedOp {
    Resource(GpuVa, u64, Perms, u32, u64),
    Pages(GpuVa, Perms, Vec<GuestPhysAddr>),
    Unmap(GpuVa, u64),
}

impl OwnedOp {
    fn as_op(&self) -> BindOp<'_> {
        match self {
            OwnedOp::Resource(va, size, perms, res, offset) => BindOp::MapResource {
                va: *va,
                size: *size,
                perms: *perms,
                resource: ResourceId(*res),
                offset: *offset,
            },
            OwnedOp::Pages(va, perms, pages) => BindOp::MapPages {
                va: *va,
                perms: *perms,
                pages: PageList::new(pages),
            },
            OwnedOp::Unmap(va, size) => BindOp::Unmap {
                va: *va,
                size: *size,
            },
        }
    }
}

fn bind_op() -> impl Strategy<Value = OwnedOp> {
    prop_oneof![
        (
            page_va(),
            size_pages(),
            perms(),
            any::<u32>(),
            0u64..1 << 40
        )
            .prop_map(|(va, size, p, res, off)| OwnedOp::Resource(
                va,
                size,
                p,
                res,
                off << 12
            )),
        (page_va(), perms(), prop::collection::vec(gpa(), 1..8))
            .prop_map(|(va, p, pages)| OwnedOp::Pages(va, p, pages)),
        (page_va(), size_pages()).prop_map(|(va, size)| OwnedOp::Unmap(va, size)),
    ]
}

fn range_attr() -> impl Strategy<Value = RangeAttr> {
    (
        page_va(),
        size_pages(),
        prop::option::of((0u32..=7).prop_map(|b| Perms::from_bits(b).unwrap())),
        prop::option::of(prop_oneof![
            Just(FaultPolicy::Recoverable),
            Just(FaultPolicy::Fatal)
        ]),
        prop::option::of(12u8..=30),
        prop::option::of(any::<bool>()),
    )
        .prop_filter("at least one attribute", |t| {
            t.2.is_some() || t.3.is_some() || t.4.is_some() || t.5.is_some()
        })
        .prop_map(
            |(va, size, access, fault_policy, granule_shift, prefault)| RangeAttr {
                va,
                size,
                attrs: RangeAttrs {
                    access,
                    fault_policy,
                    granule_shift,
                    prefault,
                },
            },
        )
}

fn aligned(align: u64) -> impl Strategy<Value = GpuVa> {
    (0u64..1 << 40).prop_map(move |i| GpuVa(i * align))
}

fn count() -> impl Strategy<Value = u64> {
    1u64..=1 << 20
}

fn kernel() -> impl Strategy<Value = Kernel> {
    prop_oneof![
        (aligned(4), count(), any::<u32>()).prop_map(|(dst, count, value)| Kernel::Fill {
            dst,
            count,
            value
        }),
        (aligned(1), count(), 0u64..1 << 20).prop_map(|(dst, size, gap)| Kernel::Copy {
            dst,
            src: GpuVa(dst.raw() + size + gap),
            size,
        }),
        (aligned(8), 1u32..1024, count(), any::<u64>()).prop_map(
            |(counters, num_counters, items, addend)| Kernel::AtomicAdd {
                counters,
                num_counters,
                items,
                addend,
            }
        ),
        (aligned(4), aligned(4), count(), -1.0e6f32..1.0e6)
            .prop_map(|(x, y, count, a)| { Kernel::Saxpy { x, y, count, a } }),
        (aligned(4), aligned(4), aligned(4), count()).prop_map(|(dst, src, indices, count)| {
            Kernel::Gather {
                dst,
                src,
                indices,
                count,
            }
        }),
        (aligned(8), 0u64..=1 << 36, aligned(8)).prop_map(|(head, max_steps, result)| {
            Kernel::PointerChase {
                head,
                max_steps,
                result,
            }
        }),
    ]
}

fn session_init() -> impl Strategy<Value = SessionInit> {
    (
        any::<u16>(),
        prop_oneof![
            Just(Profile::Compat),
            (1u32..8).prop_map(|event_ring| Profile::Native { event_ring })
        ],
        (8u64..=(1 << 17)).prop_map(|n| n * 8),
        4u32..=16,
        1u64..=1024,
        any::<bool>(),
    )
        .prop_map(|(minor, profile, reply_size, ring_shift, slots, shared)| {
            let ring = FaultRingLayout::new(1 << ring_shift).unwrap();
            let round = |x: u64| x.div_ceil(64) * 64;
            let reply = Region {
                resource: ResourceId(1),
                offset: 0,
                size: reply_size,
            };
            let fault_ring = Region {
                resource: ResourceId(if shared { 1 } else { 2 }),
                offset: if shared { round(reply_size) } else { 0 },
                size: ring.size(),
            };
            let signals = Region {
                resource: ResourceId(if shared { 1 } else { 3 }),
                offset: if shared {
                    round(fault_ring.offset + ring.size())
                } else {
                    64
                },
                size: slots * 32,
            };
            SessionInit {
                version_minor: minor,
                ..SessionInit::new(profile, reply, fault_ring, signals)
            }
        })
}

/// A valid request the guest can build, owning its data.
#[derive(Clone, Debug)]
enum Owned {
    Simple(Request<'static>),
    Bind(Vec<OwnedOp>),
    Faults(Vec<FaultReplyEntry>),
}

impl Owned {
    fn with_request<R>(&self, f: impl FnOnce(&Request<'_>) -> R) -> R {
        match self {
            Owned::Simple(r) => f(r),
            Owned::Bind(ops) => {
                let ops: Vec<BindOp<'_>> = ops.iter().map(OwnedOp::as_op).collect();
                f(&Request::VmBind(VmBind::new(&ops)))
            }
            Owned::Faults(entries) => f(&Request::FaultReply(FaultReply::new(entries))),
        }
    }
}

/// A valid `USER_QUEUE_CREATE` (1.1).
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
                // 0 encodes "none".
                wptr: wptr.filter(|w| w.raw() != 0),
                doorbell,
                status: status.filter(|s| s.raw() != 0),
            },
        )
}

fn valid_request() -> impl Strategy<Value = Owned> {
    let simple = prop_oneof![
        session_init().prop_map(Request::SessionInit),
        Just(Request::SessionDestroy),
        Just(Request::DeviceQuery),
        range_attr().prop_map(Request::RangeAttr),
        (0u8..=15).prop_map(|priority| Request::QueueCreate(QueueCreate { priority })),
        any::<u32>().prop_map(|q| Request::QueueDestroy(QueueDestroy { queue: QueueId(q) })),
        (
            any::<u32>(),
            kernel(),
            prop::option::of(0u32..u32::MAX),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(q, kernel, signal, notify, completion_value)| {
                Request::Dispatch(Dispatch {
                    queue: QueueId(q),
                    kernel,
                    signal: signal.map(SignalIndex),
                    notify,
                    completion_value,
                })
            }),
        Just(Request::EventArm),
        Just(Request::QueueCounters),
        Just(Request::DoorbellKick),
        user_queue_create().prop_map(Request::UserQueueCreate),
        any::<u32>()
            .prop_map(|q| Request::UserQueueDestroy(UserQueueDestroy { queue: QueueId(q) })),
    ];
    let entry = (
        any::<u64>(),
        prop_oneof![Just(FaultOutcome::Resolved), Just(FaultOutcome::Rejected)],
    )
        .prop_map(|(id, outcome)| FaultReplyEntry {
            fault_id: FaultId(id),
            outcome,
        });
    prop_oneof![
        simple.prop_map(Owned::Simple),
        prop::collection::vec(bind_op(), 1..12).prop_map(Owned::Bind),
        prop::collection::vec(entry, 1..64).prop_map(Owned::Faults),
    ]
}

fn encode_one(owned: &Owned) -> Vec<u8> {
    owned.with_request(|r| {
        let mut out = Vec::new();
        let reply_off = if r.command().has_reply() { 0 } else { NO_REPLY };
        r.encode(7, reply_off, &mut out).unwrap();
        out
    })
}

proptest! {
    #[test]
    fn stream_never_panics_on_random_bytes(payload in prop::collection::vec(any::<u8>(), 0..1024)) {
        run_stream(&payload, DecodeLimits::PROTOCOL);
    }

    #[test]
    fn stream_never_panics_on_headed_garbage(
        parts in prop::collection::vec(headed_request(), 0..8),
        tail in prop::collection::vec(any::<u8>(), 0..24),
        max_bind_ops in 0u32..4,
    ) {
        let mut payload: Vec<u8> = parts.concat();
        payload.extend(tail);
        let limits = DecodeLimits { max_bind_ops, ..DecodeLimits::PROTOCOL };
        run_stream(&payload, limits);
    }

    #[test]
    fn every_decoder_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300), id in 0u32..8) {
        if let Ok(req) = Request::decode(&bytes) {
            exercise(&req);
        }
        let _ = RequestHeader::decode(&bytes);
        let _ = ReplyHeader::decode(&bytes);
        let _ = Reply::decode(&bytes);
        let _ = Capset::decode(&bytes);
        let _ = FaultRecord::decode(&bytes);
        let _ = FaultRingHeader::decode(&bytes);
        let _ = SignalSlot::decode(&bytes);
        let _ = SessionInit::reply_region_of(&bytes);
        let _ = Kernel::decode_args(id, &bytes);
        let _ = Kernel::decode_args(id, bytes.get(..kernel::args_len_of(id).unwrap_or(0)).unwrap_or(&[]));
    }

    #[test]
    fn decoders_survive_headed_garbage(bytes in headed_request()) {
        if let Ok(req) = Request::decode(&bytes) {
            exercise(&req);
        }
        let _ = SessionInit::reply_region_of(&bytes);
    }

    #[test]
    fn decoders_survive_structured_requests(bytes in structured_request()) {
        if let Ok(req) = Request::decode(&bytes) {
            exercise(&req);
        }
        let _ = SessionInit::reply_region_of(&bytes);
        run_stream(&bytes, DecodeLimits::PROTOCOL);
    }

    #[test]
    fn fixed_size_decoders_survive_any_contents(
        capset in prop::collection::vec(any::<u8>(), 128..160),
        record in prop::array::uniform32(any::<u8>()),
        slot in prop::array::uniform32(any::<u8>()),
        reply in prop::collection::vec(any::<u8>(), 80),
        reply_cmd in prop::sample::select(&CMDS[..]),
    ) {
        // Steer the magic, version and size so decoding goes deep.
        let mut capset = capset;
        capset[0..4].copy_from_slice(b"VGNC");
        capset[4..6].copy_from_slice(&1u16.to_le_bytes());
        capset[8..12].copy_from_slice(&128u32.to_le_bytes());
        prop_assert!(Capset::decode(&capset).is_ok());
        if let Ok(r) = FaultRecord::decode(&record) {
            prop_assert_eq!(FaultRecord::decode(&r.encode()), Ok(r));
        }
        if let Ok(s) = SignalSlot::decode(&slot) {
            prop_assert_eq!(s.encode(), slot);
        }
        let mut reply = reply;
        let status = u32::from(reply[4]) % 18;
        reply[4..8].copy_from_slice(&status.to_le_bytes());
        reply[8..12].copy_from_slice(&guest_proto::opcode::reply_len(reply_cmd).to_le_bytes());
        reply[12..16].copy_from_slice(&reply_cmd.to_le_bytes());
        if let Ok(r) = Reply::decode(&reply) {
            prop_assert_eq!(r.payload.cmd(), reply_cmd);
            let enc = r.encode();
            prop_assert_eq!(Reply::decode(enc.as_bytes()), Ok(r));
        }
    }

    #[test]
    fn mutated_valid_requests_never_panic(
        owned in valid_request(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
    ) {
        let mut bytes = encode_one(&owned);
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        if let Ok(req) = Request::decode(&bytes) {
            exercise(&req);
        }
        run_stream(&bytes, DecodeLimits::PROTOCOL);
    }

    #[test]
    fn valid_requests_with_fields_overwritten_never_panic(
        owned in valid_request(),
        writes in prop::collection::vec(
            (any::<prop::sample::Index>(), interesting(), prop_oneof![Just(None), interesting().prop_map(Some)]),
            1..4,
        ),
    ) {
        // Overwrite whole 32- or 64-bit words at field boundaries with edge
        // values: every other field stays valid, so decoding reaches the
        // check of the field that changed.
        let mut bytes = encode_one(&owned);
        let words = bytes.len() / 4;
        for (at, low, high) in writes {
            // Keep the header's framing, or nothing past it is reached.
            let i = 2 + at.index(words - 2);
            bytes[4 * i..4 * i + 4].copy_from_slice(&low.to_le_bytes());
            if let (Some(high), true) = (high, 4 * i + 8 <= bytes.len()) {
                bytes[4 * i + 4..4 * i + 8].copy_from_slice(&high.to_le_bytes());
            }
        }
        if let Ok(req) = Request::decode(&bytes) {
            exercise(&req);
        }
        run_stream(&bytes, DecodeLimits::PROTOCOL);
    }

    #[test]
    fn truncated_and_extended_valid_requests_are_refused(owned in valid_request(), cut in 1usize..64) {
        let bytes = encode_one(&owned);
        let short = &bytes[..bytes.len().saturating_sub(cut)];
        prop_assert!(Request::decode(short).is_err());
        let mut long = bytes.clone();
        long.extend(vec![0u8; cut.div_ceil(8) * 8]);
        prop_assert!(Request::decode(&long).is_err());
    }

    #[test]
    fn any_valid_request_round_trips(
        owned in prop::collection::vec(valid_request(), 1..8),
        first_seqno in any::<u32>(),
    ) {
        let mut writer = RequestWriter::new(0..1 << 20)
            .with_first_seqno(first_seqno)
            .with_max_bytes(usize::MAX);
        let mut tickets = Vec::new();
        for o in &owned {
            tickets.push(o.with_request(|r| writer.push(r)).unwrap());
        }
        let framed: Vec<_> = RequestStream::new(writer.as_bytes())
            .map(Result::unwrap)
            .collect();
        prop_assert_eq!(framed.len(), owned.len());
        for ((f, o), t) in framed.iter().zip(&owned).zip(&tickets) {
            let decoded = f.decode().unwrap();
            o.with_request(|r| assert_eq!(&decoded, r));
            prop_assert_eq!(f.header.seqno, t.seqno);
            prop_assert_eq!(f.header.reply_off, t.reply_off.unwrap_or(NO_REPLY));
            // The encoding is canonical: decoding and re-encoding gives the
            // same bytes.
            let mut again = Vec::new();
            decoded.encode(f.header.seqno, f.header.reply_off, &mut again).unwrap();
            prop_assert_eq!(&again[..], f.bytes);
        }
    }
}
