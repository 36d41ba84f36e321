//! Faults resolved by the guest kernel (protocol 1.1, `docs/protocol.md`
//! section 15): `SVM_ATTACH` / `SVM_DETACH`, the kernel reply region, the
//! kernel's fault ring `state`, and the rings only the kernel submits on.
//!
//! A guest kernel driver that mirrors a process's address space into the
//! context's GPU VM (HMM + MMU notifiers) must own the context's faults and
//! talk to the device with replies user space can neither read nor forge.
//! So it names a fault ring and a reply region of its own, by
//! guest-physical address (no resource: nothing user space could name in a
//! request), with `SVM_ATTACH`; its requests then reply into that region,
//! selected by bit 31 of `reply_off` ([`KERNEL_REPLY`]), an offset that
//! does not fit any 1.0 reply buffer.

use crate::command::{DecodeLimits, MAX_REPLY_BUFFER, MIN_REPLY_BUFFER};
use crate::error::DecodeError;
use crate::fault::FaultRingLayout;
use crate::header::{NO_REPLY, REQUEST_ALIGN, ReplyLost, ReplySlot, RequestHeader};
use crate::opcode::{Command, reply_len};
use crate::types::{GuestPhysAddr, PAGE_SIZE};
use crate::wire::{put_u64, reserved_at, u64_at};

/// `reply_off` bit 31: the reply goes into the kernel reply region.
pub const KERNEL_REPLY: u32 = 0x8000_0000;
/// Request length of `SVM_ATTACH`.
pub const SVM_ATTACH_LEN: usize = 56;
/// Request length of `SVM_DETACH`.
pub const SVM_DETACH_LEN: usize = 16;
/// Native profile: the ring the kernel's requests arrive on.
pub const KERNEL_RING: u8 = 63;
/// Native profile: the ring of the kernel's `EVENT_ARM`.
pub const KERNEL_EVENT_RING: u8 = 62;
/// Offset of `state` in the kernel's fault ring header (reserved, 0, in a
/// session's own ring).
pub const FAULT_RING_STATE_OFFSET: u64 = 16;

/// The kernel fault ring's `state` (offset 16 of its header).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum RingState {
    /// The device writes the session's faults here.
    Attached = 1,
    /// The attachment ended (`SVM_DETACH` or the end of the session); the
    /// device never writes the ring again.
    Detached = 2,
}

impl RingState {
    /// Parses the wire value (0 is a ring that was never attached).
    pub const fn from_u32(v: u32) -> Option<RingState> {
        match v {
            1 => Some(RingState::Attached),
            2 => Some(RingState::Detached),
            _ => None,
        }
    }
}

/// The offset in the kernel reply region a `reply_off` names, if it is a
/// `KERNEL_REPLY` offset (bit 31 set and not [`NO_REPLY`]).
pub const fn kernel_reply_offset(reply_off: u32) -> Option<u32> {
    if reply_off != NO_REPLY && reply_off & KERNEL_REPLY != 0 {
        Some(reply_off & !KERNEL_REPLY)
    } else {
        None
    }
}

/// Where the reply of a kernel request with a `KERNEL_REPLY` offset goes in
/// a kernel reply region of `region_size` bytes: the rules of section 4.2
/// applied to the region. `None` if `reply_off` is not a `KERNEL_REPLY`
/// offset.
pub fn kernel_reply_slot(
    header: &RequestHeader,
    region_size: u64,
) -> Option<Result<ReplySlot, ReplyLost>> {
    let offset = kernel_reply_offset(header.reply_off)?;
    let len = reply_len(header.cmd);
    let fits = u64::from(offset)
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= region_size);
    Some(if (offset as usize).is_multiple_of(REQUEST_ALIGN) && fits {
        Ok(ReplySlot::At { offset, len })
    } else {
        Err(ReplyLost {
            reply_off: header.reply_off,
            len,
            buffer_size: region_size,
        })
    })
}

/// A physically contiguous range of guest RAM (16 bytes on the wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct GpaRegion {
    /// First byte; page-aligned.
    pub gpa: GuestPhysAddr,
    /// Length in bytes.
    pub size: u64,
}

impl GpaRegion {
    /// First byte past the region, if it does not wrap.
    pub const fn end(&self) -> Option<u64> {
        self.gpa.0.checked_add(self.size)
    }

    /// Whether the two regions share a byte.
    pub fn overlaps(&self, other: &GpaRegion) -> bool {
        match (self.end(), other.end()) {
            (Some(end), Some(other_end)) => self.gpa.0 < other_end && other.gpa.0 < end,
            _ => false,
        }
    }

    fn decode_at(bytes: &[u8], at: usize, field: &'static str) -> Result<GpaRegion, DecodeError> {
        let region = GpaRegion {
            gpa: GuestPhysAddr(u64_at(bytes, at)?),
            size: u64_at(bytes, at.saturating_add(8))?,
        };
        if !region.gpa.is_page_aligned() {
            return Err(DecodeError::Misaligned {
                field,
                value: region.gpa.0,
            });
        }
        region.end().ok_or(DecodeError::Overflow { field })?;
        Ok(region)
    }

    fn write_at(&self, buf: &mut [u8], at: usize) {
        put_u64(buf, at, self.gpa.0);
        put_u64(buf, at.saturating_add(8), self.size);
    }
}

/// `SVM_ATTACH` (0x0050): moves the session's faults into the guest
/// kernel's own fault ring and names the kernel reply region.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SvmAttach {
    /// The kernel's fault ring: `128 + 32 * capacity` bytes.
    pub fault_ring: GpaRegion,
    /// The kernel reply region: a multiple of 8, 64 B ..= 1 MiB.
    pub reply: GpaRegion,
}

impl SvmAttach {
    /// The fault ring's geometry. Always `Some` for a decoded request.
    pub fn fault_ring_layout(&self) -> Option<FaultRingLayout> {
        FaultRingLayout::from_size(self.fault_ring.size, crate::fault::MAX_FAULT_RING_CAPACITY).ok()
    }

    /// The reply region of an `SVM_ATTACH` whose decoding failed, if that
    /// region alone is valid: the device writes the error reply there
    /// (for a kernel request only).
    pub fn reply_region_of(bytes: &[u8]) -> Option<GpaRegion> {
        let header = RequestHeader::decode(bytes).ok()?;
        if header.cmd != Command::SvmAttach.as_u32() || bytes.len() != SVM_ATTACH_LEN {
            return None;
        }
        let reply = GpaRegion::decode_at(bytes, 40, "reply.gpa").ok()?;
        check_reply_size(reply.size).ok()?;
        Some(reply)
    }

    pub(crate) fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<SvmAttach, DecodeError> {
        if bytes.len() != SVM_ATTACH_LEN {
            return Err(DecodeError::WrongLength {
                expected: SVM_ATTACH_LEN,
                actual: bytes.len(),
            });
        }
        reserved_at(bytes, 16, 4, "flags")?;
        reserved_at(bytes, 20, 4, "reserved")?;
        let attach = SvmAttach {
            fault_ring: GpaRegion::decode_at(bytes, 24, "fault_ring.gpa")?,
            reply: GpaRegion::decode_at(bytes, 40, "reply.gpa")?,
        };
        FaultRingLayout::from_size(attach.fault_ring.size, limits.max_fault_ring_records)?;
        check_reply_size(attach.reply.size)?;
        if attach.fault_ring.overlaps(&attach.reply) {
            return Err(DecodeError::Overlap {
                first: "fault_ring",
                second: "reply",
            });
        }
        Ok(attach)
    }

    pub(crate) fn write(&self, buf: &mut [u8]) {
        self.fault_ring.write_at(buf, 24);
        self.reply.write_at(buf, 40);
    }
}

fn check_reply_size(size: u64) -> Result<(), DecodeError> {
    if !size.is_multiple_of(8) {
        return Err(DecodeError::Misaligned {
            field: "reply.size",
            value: size,
        });
    }
    if !(MIN_REPLY_BUFFER..=MAX_REPLY_BUFFER).contains(&size) {
        return Err(DecodeError::InvalidValue {
            field: "reply.size",
            value: size,
        });
    }
    Ok(())
}

/// `SVM_ATTACH` reply payload (8 bytes, total 24).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct SvmAttachReply {
    /// Records in the kernel's fault ring.
    pub fault_ring_capacity: u32,
}

/// Bytes of guest RAM the pages of a region touch, rounded out to whole
/// pages: `(first page, bytes)`.
pub fn page_span(region: &GpaRegion) -> Option<(GuestPhysAddr, u64)> {
    let end = region.end()?.checked_next_multiple_of(PAGE_SIZE)?;
    let first = region.gpa.0 - region.gpa.0 % PAGE_SIZE;
    Some((GuestPhysAddr(first), end - first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_reply_offsets() {
        assert_eq!(kernel_reply_offset(0x8000_0040), Some(0x40));
        assert_eq!(kernel_reply_offset(0x8000_0000), Some(0));
        assert_eq!(kernel_reply_offset(NO_REPLY), None);
        assert_eq!(kernel_reply_offset(0x40), None);
        let h = |reply_off| RequestHeader {
            cmd: Command::SvmAttach.as_u32(),
            len: 56,
            seqno: 1,
            reply_off,
        };
        assert_eq!(
            kernel_reply_slot(&h(0x8000_0fe8), 4096),
            Some(Ok(ReplySlot::At {
                offset: 0xfe8,
                len: 24
            }))
        );
        assert!(matches!(
            kernel_reply_slot(&h(0x8000_0ff0), 4096),
            Some(Err(_))
        ));
        assert!(matches!(
            kernel_reply_slot(&h(0x8000_0004), 4096),
            Some(Err(_))
        ));
        assert_eq!(kernel_reply_slot(&h(0x10), 4096), None);
        assert_eq!(kernel_reply_slot(&h(NO_REPLY), 4096), None);
    }

    #[test]
    fn page_spans_round_out() {
        let r = GpaRegion {
            gpa: GuestPhysAddr(0x1000),
            size: 128 + 32 * 16,
        };
        assert_eq!(page_span(&r), Some((GuestPhysAddr(0x1000), 0x1000)));
        let r = GpaRegion {
            gpa: GuestPhysAddr(0x1000),
            size: 0x1001,
        };
        assert_eq!(page_span(&r), Some((GuestPhysAddr(0x1000), 0x2000)));
        let wraps = GpaRegion {
            gpa: GuestPhysAddr(u64::MAX - 0xfff),
            size: 0x1000,
        };
        assert_eq!(page_span(&wraps), None);
        assert_eq!(RingState::from_u32(2), Some(RingState::Detached));
        assert_eq!(RingState::from_u32(0), None);
    }
}
