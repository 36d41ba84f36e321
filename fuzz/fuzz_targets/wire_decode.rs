//! Every decoder of the wire codec on arbitrary bytes: no panic, no
//! out-of-bounds access, and every accepted request can be walked to the
//! end the way the device walks it.

#![no_main]

use guest_proto::aql::AqlPacket;
use guest_proto::bind::BindOp;
use guest_proto::capset::Capset;
use guest_proto::command::DecodeLimits;
use guest_proto::fault::{FaultRecord, FaultRingHeader};
use guest_proto::header::{ReplyHeader, RequestHeader};
use guest_proto::reply::Reply;
use guest_proto::sdma::{self, SdmaPacket};
use guest_proto::signal::SignalSlot;
use guest_proto::stream::RequestStream;
use guest_proto::uq::QueueStatusBlock;
use guest_proto::{PAGE_SIZE, Request};
use libfuzzer_sys::fuzz_target;

fn walk(request: &Request<'_>) {
    match request {
        Request::VmBind(bind) => {
            let mut failed = false;
            for op in bind.ops() {
                assert!(!failed, "ops after an error");
                match op {
                    Ok(BindOp::MapPages { pages, .. }) => {
                        assert_eq!(pages.iter().count() as u64 * PAGE_SIZE, pages.size());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        failed = true;
                        let _ = e.status();
                    }
                }
            }
        }
        Request::FaultReply(reply) => assert_eq!(reply.entries().count(), reply.len()),
        Request::SessionInit(init) => {
            assert!(init.fault_ring_layout().is_some());
            assert!(init.signal_slots().is_some());
        }
        Request::Dispatch(d) => assert_eq!(d.kernel.validate(), Ok(())),
        Request::UserQueueCreate(q) => {
            for (va, len) in q.ranges() {
                assert!(va.checked_add(len).is_some());
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The device's path: a SUBMIT_3D payload, framed and decoded with the
    // default limits and with the tightest ones.
    let tight = DecodeLimits {
        max_bind_ops: 1,
        max_signal_slots: 1,
        max_fault_ring_records: 16,
    };
    let device = DecodeLimits::from_capset(&Capset::default());
    for limits in [DecodeLimits::PROTOCOL, device, tight] {
        for item in RequestStream::new(data).with_limits(limits) {
            match item {
                Ok(framed) => match framed.decode() {
                    Ok(request) => walk(&request),
                    Err(e) => {
                        let _ = e.status();
                    }
                },
                Err(lost) => {
                    let _ = lost.status();
                    break;
                }
            }
        }
    }
    let _ = Request::decode(data);
    let _ = RequestHeader::decode(data);
    // The guest's path: everything the device writes into guest memory.
    let _ = Reply::decode(data);
    let _ = ReplyHeader::decode(data);
    let _ = Capset::decode(data);
    let _ = FaultRecord::decode(data);
    let _ = FaultRingHeader::decode(data);
    let _ = SignalSlot::decode(data);
    let _ = QueueStatusBlock::decode(data);
    // The device's other path (1.1): ring contents of user queues.
    let dwords: Vec<u32> = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(&header) = dwords.first() {
        if let Ok(n) = sdma::packet_dwords(header) {
            if let Some(packet) = dwords.get(..n as usize) {
                if let Ok(p) = SdmaPacket::decode(packet) {
                    assert_eq!(SdmaPacket::decode(&p.encode()), Ok(p));
                }
            }
        }
    }
    if let Some(slot) = data.get(..64).and_then(|s| <&[u8; 64]>::try_from(s).ok()) {
        let _ = AqlPacket::decode(slot);
    }
});
