//! Decode, encode, decode: every request the device accepts means the same
//! thing after the guest's encoder writes it again, and encodes to the
//! same bytes (the format has one encoding per request: reserved fields
//! are zero, lengths are exact), except for the order of `RANGE_ATTR`'s
//! attributes, which the protocol leaves free (5.6): the encoder writes
//! them in type order, the same length, and that encoding is a fixed point.
//!
//! Replies, fault records, signal slots and the capset, which the guest
//! decodes, round-trip the same way.

#![no_main]

use guest_proto::Request;
use guest_proto::capset::Capset;
use guest_proto::fault::{FaultRecord, FaultRingHeader};
use guest_proto::header::RequestHeader;
use guest_proto::reply::Reply;
use guest_proto::signal::SignalSlot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = Request::decode(data) {
        let header = RequestHeader::decode(data).expect("decoded above");
        let mut again = Vec::new();
        request
            .encode(header.seqno, header.reply_off, &mut again)
            .expect("an accepted request encodes");
        // The same meaning, compared as bytes (a NaN SAXPY factor is not
        // equal to itself as an f32): what `again` decodes to encodes to
        // `again`, a fixed point.
        let back = Request::decode(&again).expect("the encoder's output decodes");
        let mut third = Vec::new();
        back.encode(header.seqno, header.reply_off, &mut third)
            .expect("encodes again");
        assert_eq!(third, again, "decode(encode(r)) is r");
        if matches!(request, Request::RangeAttr(_)) {
            assert_eq!(back, request, "the same attributes in type order");
            assert_eq!(again.len(), data.len());
        } else {
            assert_eq!(again, data, "one encoding per request");
        }
    }
    if let Ok(reply) = Reply::decode(data) {
        let encoded = reply.encode();
        assert_eq!(Reply::decode(encoded.as_bytes()), Ok(reply));
    }
    if let Ok(record) = FaultRecord::decode(data) {
        assert_eq!(FaultRecord::decode(&record.encode()), Ok(record));
    }
    if let Ok(header) = FaultRingHeader::decode(data) {
        assert_eq!(FaultRingHeader::decode(&header.encode()), Ok(header));
    }
    if let Ok(slot) = SignalSlot::decode(data) {
        assert_eq!(SignalSlot::decode(&slot.encode()), Ok(slot));
    }
    if let Ok(capset) = Capset::decode(data) {
        assert_eq!(Capset::decode(&capset.encode()), Ok(capset));
    }
});
