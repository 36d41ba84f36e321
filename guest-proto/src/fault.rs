//! The fault ring, fault records, and the guest's `FAULT_REPLY` answers.
//!
//! A recoverable fault has to reach the guest without a fence (the compat
//! profile cannot hold one) and without losing anything when the guest is
//! slow. So it is a single-producer single-consumer ring in guest memory:
//! the device owns `tail` and the records, the guest owns `head`, the two
//! indices are free-running `u32`s on separate cache lines, and a full ring
//! defers faults in the device instead of dropping them
//! (`docs/protocol.md` section 8). This module has the ring's byte layout,
//! the 32-byte record, and the `FAULT_REPLY` request that ends faults.

use core::fmt;
use core::iter::FusedIterator;

use crate::error::DecodeError;
use crate::types::{AccessFlags, FaultId, GpuVa, QueueId};
use crate::wire::{put_u8, put_u32, put_u64, reserved_at, u8_at, u32_at, u64_at};

/// Size of the ring header; records start here.
pub const FAULT_RING_HEADER_SIZE: u64 = 128;
/// Size of one fault record.
pub const FAULT_RECORD_SIZE: u64 = 32;
/// Offset of `tail` (device: producer index).
pub const FAULT_RING_TAIL_OFFSET: u64 = 0;
/// Offset of `dropped` (device: records that did not fit, so far).
pub const FAULT_RING_DROPPED_OFFSET: u64 = 4;
/// Offset of `capacity` (device, at `SESSION_INIT`).
pub const FAULT_RING_CAPACITY_OFFSET: u64 = 8;
/// Offset of `record_size` (device, at `SESSION_INIT`).
pub const FAULT_RING_RECORD_SIZE_OFFSET: u64 = 12;
/// Offset of `interrupts` (device, 1.1: incremented with release ordering
/// for every interrupt, 14.7).
pub const FAULT_RING_INTERRUPTS_OFFSET: u64 = 20;
/// Offset of `head` (guest: consumer index), on its own cache line.
pub const FAULT_RING_HEAD_OFFSET: u64 = 64;
/// Smallest ring capacity.
pub const MIN_FAULT_RING_CAPACITY: u32 = 16;
/// Largest ring capacity the protocol can express: indices run modulo
/// 2^32, so the capacity must divide it.
pub const MAX_FAULT_RING_CAPACITY: u32 = 1 << 31;
/// `queue_id` of a prefault record.
pub const NO_QUEUE: u32 = 0xFFFF_FFFF;
/// Most entries in one `FAULT_REPLY`.
pub const MAX_FAULT_REPLY_ENTRIES: u32 = 4096;
/// Length of the fixed part of a `FAULT_REPLY` request.
pub const FAULT_REPLY_FIXED_LEN: usize = 24;
/// Size of one `FAULT_REPLY` entry.
pub const FAULT_REPLY_ENTRY_SIZE: usize = 16;

/// The geometry of a fault ring of a given capacity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FaultRingLayout {
    capacity: u32,
}

impl FaultRingLayout {
    /// A ring of `capacity` records: a power of two in
    /// `MIN_FAULT_RING_CAPACITY ..= MAX_FAULT_RING_CAPACITY`.
    pub const fn new(capacity: u32) -> Option<FaultRingLayout> {
        if capacity.is_power_of_two()
            && capacity >= MIN_FAULT_RING_CAPACITY
            && capacity <= MAX_FAULT_RING_CAPACITY
        {
            Some(FaultRingLayout { capacity })
        } else {
            None
        }
    }

    /// The layout of a fault ring region of `size` bytes, which must be
    /// `128 + 32 * capacity` with a capacity [`FaultRingLayout::new`]
    /// accepts and at most `max_capacity`.
    pub fn from_size(size: u64, max_capacity: u32) -> Result<FaultRingLayout, DecodeError> {
        let bad_shape = DecodeError::InvalidValue {
            field: "fault_ring.size",
            value: size,
        };
        let records = size.checked_sub(FAULT_RING_HEADER_SIZE).ok_or(bad_shape)?;
        if records % FAULT_RECORD_SIZE != 0 {
            return Err(bad_shape);
        }
        let capacity = u32::try_from(records / FAULT_RECORD_SIZE).map_err(|_| bad_shape)?;
        let layout = FaultRingLayout::new(capacity).ok_or(bad_shape)?;
        if capacity > max_capacity {
            return Err(DecodeError::CountTooLarge {
                field: "fault ring capacity",
                count: u64::from(capacity),
                max: u64::from(max_capacity),
            });
        }
        Ok(layout)
    }

    /// Number of records.
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Size of the whole ring region.
    pub const fn size(&self) -> u64 {
        FAULT_RING_HEADER_SIZE + FAULT_RECORD_SIZE * self.capacity as u64
    }

    /// Offset in the ring region of the record with free-running index
    /// `index`.
    pub const fn record_offset(&self, index: u32) -> u64 {
        FAULT_RING_HEADER_SIZE + FAULT_RECORD_SIZE * (index & (self.capacity - 1)) as u64
    }

    /// How many records the device may still write, given the two indices.
    /// A `head` that makes `tail - head` exceed the capacity is garbage
    /// written by the guest, and the ring counts as full (8.2).
    pub const fn free_records(&self, tail: u32, head: u32) -> u32 {
        self.capacity.saturating_sub(tail.wrapping_sub(head))
    }
}

/// A snapshot of the ring header (8.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FaultRingHeader {
    /// Producer index, written by the device.
    pub tail: u32,
    /// Records that did not fit so far, written by the device.
    pub dropped: u32,
    /// Ring capacity, written by the device at `SESSION_INIT`.
    pub capacity: u32,
    /// Size of a record, written by the device at `SESSION_INIT`: 32.
    pub record_size: u32,
    /// Interrupts raised so far, free-running modulo 2^32 (1.1), written by
    /// the device.
    pub interrupts: u32,
    /// Consumer index, written by the guest.
    pub head: u32,
}

impl FaultRingHeader {
    /// The header `SESSION_INIT` writes: empty, with the ring's geometry.
    pub const fn initial(layout: FaultRingLayout) -> FaultRingHeader {
        FaultRingHeader {
            tail: 0,
            dropped: 0,
            capacity: layout.capacity,
            record_size: FAULT_RECORD_SIZE as u32,
            interrupts: 0,
            head: 0,
        }
    }

    /// The 128 header bytes, reserved bytes zero.
    pub fn encode(&self) -> [u8; FAULT_RING_HEADER_SIZE as usize] {
        let mut b = [0u8; FAULT_RING_HEADER_SIZE as usize];
        put_u32(&mut b, FAULT_RING_TAIL_OFFSET as usize, self.tail);
        put_u32(&mut b, FAULT_RING_DROPPED_OFFSET as usize, self.dropped);
        put_u32(&mut b, FAULT_RING_CAPACITY_OFFSET as usize, self.capacity);
        put_u32(
            &mut b,
            FAULT_RING_RECORD_SIZE_OFFSET as usize,
            self.record_size,
        );
        put_u32(
            &mut b,
            FAULT_RING_INTERRUPTS_OFFSET as usize,
            self.interrupts,
        );
        put_u32(&mut b, FAULT_RING_HEAD_OFFSET as usize, self.head);
        b
    }

    /// Reads the header fields from a snapshot of at least 128 bytes.
    /// Reserved bytes are not checked: they are not part of any exchange.
    pub fn decode(bytes: &[u8]) -> Result<FaultRingHeader, DecodeError> {
        if bytes.len() < FAULT_RING_HEADER_SIZE as usize {
            return Err(DecodeError::TooShort {
                needed: FAULT_RING_HEADER_SIZE as usize,
                actual: bytes.len(),
            });
        }
        Ok(FaultRingHeader {
            tail: u32_at(bytes, FAULT_RING_TAIL_OFFSET as usize)?,
            dropped: u32_at(bytes, FAULT_RING_DROPPED_OFFSET as usize)?,
            capacity: u32_at(bytes, FAULT_RING_CAPACITY_OFFSET as usize)?,
            record_size: u32_at(bytes, FAULT_RING_RECORD_SIZE_OFFSET as usize)?,
            interrupts: u32_at(bytes, FAULT_RING_INTERRUPTS_OFFSET as usize)?,
            head: u32_at(bytes, FAULT_RING_HEAD_OFFSET as usize)?,
        })
    }
}

/// `flags` bit of a prefault record.
pub const FAULT_FLAG_PREFAULT: u8 = 1;

/// Why a fault record exists.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FaultCause {
    /// GPU work touched the page and is stalled on it.
    Access {
        /// The queue whose work faulted first.
        queue: QueueId,
        /// Union of the merged accesses.
        access: AccessFlags,
        /// Accesses merged into this record, at least 1.
        merged: u32,
    },
    /// A `PREFAULT` range attribute asked for it; no work waits. On the
    /// wire: `queue_id = 0xFFFF_FFFF`, `access = 0`, `flags = PREFAULT`,
    /// `merged = 0`.
    Prefault,
}

/// One 32-byte fault record (8.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FaultRecord {
    /// Unique within the session.
    pub fault_id: FaultId,
    /// The faulting page (page-aligned); for a granule, the first page that
    /// faulted.
    pub va: GpuVa,
    /// log2 of the range's fault granule, 12 ..= 30.
    pub granule_shift: u8,
    /// Access fault or prefault request.
    pub cause: FaultCause,
}

impl FaultRecord {
    /// The wire form.
    pub fn encode(&self) -> [u8; FAULT_RECORD_SIZE as usize] {
        let (queue, access, flags, merged) = match self.cause {
            FaultCause::Access {
                queue,
                access,
                merged,
            } => (queue.0, access.bits(), 0, merged),
            FaultCause::Prefault => (NO_QUEUE, 0, FAULT_FLAG_PREFAULT, 0),
        };
        let mut b = [0u8; FAULT_RECORD_SIZE as usize];
        put_u64(&mut b, 0, self.fault_id.0);
        put_u64(&mut b, 8, self.va.raw());
        put_u32(&mut b, 16, queue);
        put_u8(&mut b, 20, access);
        put_u8(&mut b, 21, flags);
        put_u8(&mut b, 22, self.granule_shift);
        put_u32(&mut b, 24, merged);
        b
    }

    /// Reads a record, checking every field against its domain: a guest
    /// resolver must never act on a record it does not fully understand.
    pub fn decode(bytes: &[u8]) -> Result<FaultRecord, DecodeError> {
        if bytes.len() < FAULT_RECORD_SIZE as usize {
            return Err(DecodeError::TooShort {
                needed: FAULT_RECORD_SIZE as usize,
                actual: bytes.len(),
            });
        }
        let fault_id = FaultId(u64_at(bytes, 0)?);
        let va = GpuVa(u64_at(bytes, 8)?);
        let queue = u32_at(bytes, 16)?;
        let access = u8_at(bytes, 20)?;
        let flags = u8_at(bytes, 21)?;
        let granule_shift = u8_at(bytes, 22)?;
        reserved_at(bytes, 23, 1, "record.reserved23")?;
        let merged = u32_at(bytes, 24)?;
        reserved_at(bytes, 28, 4, "record.reserved28")?;

        if !va.is_page_aligned() {
            return Err(DecodeError::Misaligned {
                field: "record.va",
                value: va.raw(),
            });
        }
        if !(crate::attr::MIN_GRANULE_SHIFT..=crate::attr::MAX_GRANULE_SHIFT)
            .contains(&granule_shift)
        {
            return Err(invalid("record.granule_shift", u64::from(granule_shift)));
        }
        let cause = match flags {
            0 => {
                if queue == NO_QUEUE {
                    return Err(invalid("record.queue_id", u64::from(queue)));
                }
                if merged == 0 {
                    return Err(DecodeError::Zero {
                        field: "record.merged",
                    });
                }
                FaultCause::Access {
                    queue: QueueId(queue),
                    access: AccessFlags::from_bits(access)
                        .ok_or(invalid("record.access", u64::from(access)))?,
                    merged,
                }
            }
            FAULT_FLAG_PREFAULT => {
                if queue != NO_QUEUE {
                    return Err(invalid("record.queue_id", u64::from(queue)));
                }
                if access != 0 {
                    return Err(invalid("record.access", u64::from(access)));
                }
                if merged != 0 {
                    return Err(invalid("record.merged", u64::from(merged)));
                }
                FaultCause::Prefault
            }
            _ => return Err(invalid("record.flags", u64::from(flags))),
        };
        Ok(FaultRecord {
            fault_id,
            va,
            granule_shift,
            cause,
        })
    }
}

fn invalid(field: &'static str, value: u64) -> DecodeError {
    DecodeError::InvalidValue { field, value }
}

/// How the guest ends a fault.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum FaultOutcome {
    /// The guest bound the memory: replay the work.
    Resolved = 1,
    /// The address is not the guest's to give: fail the work.
    Rejected = 2,
}

impl FaultOutcome {
    /// Parses the wire value.
    pub const fn from_u32(v: u32) -> Option<FaultOutcome> {
        match v {
            1 => Some(FaultOutcome::Resolved),
            2 => Some(FaultOutcome::Rejected),
            _ => None,
        }
    }
}

/// One entry of a `FAULT_REPLY`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FaultReplyEntry {
    /// The fault.
    pub fault_id: FaultId,
    /// How it ends.
    pub outcome: FaultOutcome,
}

impl FaultReplyEntry {
    fn decode(entry: &[u8]) -> Result<FaultReplyEntry, DecodeError> {
        let fault_id = FaultId(u64_at(entry, 0)?);
        let raw = u32_at(entry, 8)?;
        reserved_at(entry, 12, 4, "entry.reserved")?;
        let outcome =
            FaultOutcome::from_u32(raw).ok_or(invalid("entry.outcome", u64::from(raw)))?;
        Ok(FaultReplyEntry { fault_id, outcome })
    }
}

/// A `FAULT_REPLY` request (5.9): decoded (a view of the request's entries,
/// all validated) or built by the guest from a slice (to encode).
#[derive(Clone, Copy)]
pub struct FaultReply<'a> {
    repr: ReplyRepr<'a>,
}

#[derive(Clone, Copy)]
enum ReplyRepr<'a> {
    Wire(&'a [u8]),
    Entries(&'a [FaultReplyEntry]),
}

impl<'a> FaultReply<'a> {
    /// A request to encode.
    pub const fn new(entries: &'a [FaultReplyEntry]) -> FaultReply<'a> {
        FaultReply {
            repr: ReplyRepr::Entries(entries),
        }
    }

    /// Decodes the request `bytes` (header included, `len` already framed).
    /// Every entry is checked here, so a malformed entry rejects the whole
    /// request before any fault ends.
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<FaultReply<'a>, DecodeError> {
        if bytes.len() < FAULT_REPLY_FIXED_LEN {
            return Err(DecodeError::TooShort {
                needed: FAULT_REPLY_FIXED_LEN,
                actual: bytes.len(),
            });
        }
        let count = u32_at(bytes, 16)?;
        if count == 0 {
            return Err(DecodeError::Zero { field: "count" });
        }
        if count > MAX_FAULT_REPLY_ENTRIES {
            return Err(DecodeError::CountTooLarge {
                field: "count",
                count: u64::from(count),
                max: u64::from(MAX_FAULT_REPLY_ENTRIES),
            });
        }
        let expected_len =
            FAULT_REPLY_FIXED_LEN as u64 + u64::from(count) * FAULT_REPLY_ENTRY_SIZE as u64;
        if expected_len != bytes.len() as u64 {
            return Err(DecodeError::CountMismatch {
                field: "count",
                count,
                expected_len,
                len: bytes.len(),
            });
        }
        reserved_at(bytes, 20, 4, "reserved")?;
        let entries = bytes.get(FAULT_REPLY_FIXED_LEN..).unwrap_or_default();
        for entry in entries.chunks_exact(FAULT_REPLY_ENTRY_SIZE) {
            FaultReplyEntry::decode(entry)?;
        }
        Ok(FaultReply {
            repr: ReplyRepr::Wire(entries),
        })
    }

    /// Number of entries.
    pub const fn len(&self) -> usize {
        match self.repr {
            ReplyRepr::Wire(bytes) => bytes.len() / FAULT_REPLY_ENTRY_SIZE,
            ReplyRepr::Entries(e) => e.len(),
        }
    }

    /// Whether there are no entries (never for a decoded request).
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries, in order.
    pub fn entries(&self) -> FaultReplyEntries<'a> {
        FaultReplyEntries {
            repr: match self.repr {
                ReplyRepr::Wire(bytes) => EntriesIterRepr::Wire(bytes),
                ReplyRepr::Entries(e) => EntriesIterRepr::Entries(e.iter()),
            },
        }
    }

    /// Length of the encoded request, header included, if it fits a `u64`.
    pub(crate) fn encoded_len(&self) -> Option<u64> {
        u64::try_from(self.len())
            .ok()?
            .checked_mul(FAULT_REPLY_ENTRY_SIZE as u64)?
            .checked_add(FAULT_REPLY_FIXED_LEN as u64)
    }

    /// Writes the request body into `buf` (the whole request).
    pub(crate) fn write(&self, buf: &mut [u8]) {
        put_u32(buf, 16, u32::try_from(self.len()).unwrap_or(u32::MAX));
        for (i, e) in self.entries().enumerate() {
            let at = FAULT_REPLY_FIXED_LEN.saturating_add(i.saturating_mul(FAULT_REPLY_ENTRY_SIZE));
            put_u64(buf, at, e.fault_id.0);
            put_u32(buf, at.saturating_add(8), e.outcome as u32);
        }
    }
}

impl PartialEq for FaultReply<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.entries().eq(other.entries())
    }
}

impl Eq for FaultReply<'_> {}

impl fmt::Debug for FaultReply<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries()).finish()
    }
}

/// Iterator over the entries of a [`FaultReply`].
#[derive(Clone, Debug)]
pub struct FaultReplyEntries<'a> {
    repr: EntriesIterRepr<'a>,
}

#[derive(Clone, Debug)]
enum EntriesIterRepr<'a> {
    Wire(&'a [u8]),
    Entries(core::slice::Iter<'a, FaultReplyEntry>),
}

impl Iterator for FaultReplyEntries<'_> {
    type Item = FaultReplyEntry;

    fn next(&mut self) -> Option<FaultReplyEntry> {
        match &mut self.repr {
            EntriesIterRepr::Wire(bytes) => loop {
                let (entry, rest) = bytes.split_first_chunk::<FAULT_REPLY_ENTRY_SIZE>()?;
                *bytes = rest;
                // Validated when the request was decoded, so never skipped.
                if let Ok(e) = FaultReplyEntry::decode(entry) {
                    return Some(e);
                }
            },
            EntriesIterRepr::Entries(it) => it.next().copied(),
        }
    }
}

impl FusedIterator for FaultReplyEntries<'_> {}
