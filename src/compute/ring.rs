//! The producer side of a session's fault ring (docs/protocol.md 8).
//!
//! The device keeps its own copy of `tail` and `dropped` and never reads
//! them back: guest memory is hostile, only `head` is the guest's to write,
//! and a `head` that claims more than `capacity` records were consumed makes
//! the ring count as full instead of letting the device overwrite records.

use gpu_backend::context::FaultRing;
use guest_proto::fault::{
    FAULT_RING_DROPPED_OFFSET, FAULT_RING_HEAD_OFFSET, FAULT_RING_INTERRUPTS_OFFSET,
    FAULT_RING_TAIL_OFFSET, FaultRecord, FaultRingHeader, FaultRingLayout,
};

use super::region::GuestRegion;

/// A session's fault ring in guest memory.
#[derive(Debug)]
pub struct FaultRingWriter {
    region: GuestRegion,
    layout: FaultRingLayout,
    tail: u32,
    dropped: u32,
}

impl FaultRingWriter {
    /// Takes over `region` and writes the initial header (tail = head =
    /// dropped = 0).
    pub fn init(region: GuestRegion, layout: FaultRingLayout) -> Option<FaultRingWriter> {
        let header = FaultRingHeader::initial(layout).encode();
        region.write(0, &header).ok()?;
        Some(FaultRingWriter {
            region,
            layout,
            tail: 0,
            dropped: 0,
        })
    }

    /// The ring's memory.
    pub fn region(&self) -> &GuestRegion {
        &self.region
    }

    /// The guest's consumer index.
    fn head(&self) -> Option<u32> {
        self.region.load_u32_acquire(FAULT_RING_HEAD_OFFSET)
    }

    /// Publishes the interrupt counter (protocol 14.7): a release store, so
    /// a guest that sees the new value also sees what the interrupt is
    /// about (signal values, mailboxes, status blocks).
    pub fn set_interrupts(&mut self, interrupts: u32) {
        if let Err(e) = self
            .region
            .store_u32_release(FAULT_RING_INTERRUPTS_OFFSET, interrupts)
        {
            log::debug!("fault ring: interrupts not published: {e}");
        }
    }

    /// Whether the ring holds records the guest has not consumed.
    pub fn has_unread(&self) -> bool {
        self.head().is_some_and(|head| head != self.tail)
    }
}

impl FaultRing for FaultRingWriter {
    fn push(&mut self, record: &FaultRecord) -> bool {
        let free = self
            .head()
            .map_or(0, |head| self.layout.free_records(self.tail, head));
        if free == 0 {
            self.dropped = self.dropped.wrapping_add(1);
            if let Err(e) = self
                .region
                .store_u32_release(FAULT_RING_DROPPED_OFFSET, self.dropped)
            {
                log::debug!("fault ring: dropped count not written: {e}");
            }
            return false;
        }
        let at = self.layout.record_offset(self.tail);
        if let Err(e) = self.region.write(at, &record.encode()) {
            log::debug!("fault ring: record not written: {e}");
            return false;
        }
        self.tail = self.tail.wrapping_add(1);
        match self
            .region
            .store_u32_release(FAULT_RING_TAIL_OFFSET, self.tail)
        {
            Ok(()) => true,
            Err(e) => {
                log::debug!("fault ring: tail not published: {e}");
                false
            }
        }
    }
}
