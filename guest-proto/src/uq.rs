//! User-mode queues (protocol 1.1, `docs/protocol.md` section 14).
//!
//! ROCm's runtime writes SDMA and AQL packets into rings in its own memory
//! and rings a doorbell with a plain store; no call into the driver sees an
//! individual submission. So the device reads rings, doorbells and signals
//! itself, through the session's GPU VM, the way a GPU's command processor
//! does through its VMID. This module holds what the guest and the device
//! exchange about such queues outside the rings: the `USER_QUEUE_CREATE`
//! and `USER_QUEUE_DESTROY` requests, the `QUEUE_COUNTERS` reply and the
//! 64-byte queue status block the device writes when a queue stops. The
//! packet formats are in [`crate::sdma`] and [`crate::aql`].

use crate::error::DecodeError;
use crate::signal::DispatchStatus;
use crate::types::{AccessFlags, GpuVa, QueueId};
use crate::wire::{put_u8, put_u32, put_u64, reserved_at, u8_at, u32_at, u64_at};

/// Request length of `USER_QUEUE_CREATE`.
pub const USER_QUEUE_CREATE_LEN: usize = 72;
/// Request length of `USER_QUEUE_DESTROY`.
pub const USER_QUEUE_DESTROY_LEN: usize = 24;
/// Smallest ring.
pub const MIN_USER_RING_SIZE: u64 = 4096;
/// Largest ring.
pub const MAX_USER_RING_SIZE: u64 = 64 << 20;
/// A ring's base must be a multiple of this.
pub const USER_RING_ALIGN: u64 = 256;
/// `rptr`, `wptr` and the doorbell are 8-aligned `u64`s.
pub const QUEUE_POINTER_ALIGN: u64 = 8;
/// Size of the queue status block.
pub const STATUS_BLOCK_SIZE: u64 = 64;
/// The status block must be aligned to this.
pub const STATUS_BLOCK_ALIGN: u64 = 64;
/// Bits of the capset's `user_queue_kinds` for every kind defined.
pub const USER_QUEUE_KINDS_ALL: u32 = UserQueueKind::Sdma.bit() | UserQueueKind::Aql.bit();

/// Offset of `state` in the status block (written last, release).
pub const STATUS_STATE_OFFSET: u64 = 0;
/// Offset of `status`.
pub const STATUS_STATUS_OFFSET: u64 = 4;
/// Offset of `fault_va`.
pub const STATUS_FAULT_VA_OFFSET: u64 = 8;
/// Offset of `packet`.
pub const STATUS_PACKET_OFFSET: u64 = 16;
/// Offset of `access`.
pub const STATUS_ACCESS_OFFSET: u64 = 24;
/// Offset of `detail`.
pub const STATUS_DETAIL_OFFSET: u64 = 32;
/// `state`: the queue runs (the device never writes this value).
pub const QUEUE_STATE_RUNNING: u32 = 0;
/// `state`: the queue stopped and processes nothing more.
pub const QUEUE_STATE_STOPPED: u32 = 1;

/// What a user queue's ring holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum UserQueueKind {
    /// gfx9 SDMA packets (the copy engine, [`crate::sdma`]).
    Sdma = 1,
    /// 64-byte HSA AQL packets (the packet processor, [`crate::aql`]).
    Aql = 2,
}

impl UserQueueKind {
    /// Parses the wire value.
    pub const fn from_u32(v: u32) -> Option<UserQueueKind> {
        match v {
            1 => Some(UserQueueKind::Sdma),
            2 => Some(UserQueueKind::Aql),
            _ => None,
        }
    }

    /// The wire value.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// Its bit in the capset's `user_queue_kinds`: `1 << kind`.
    pub const fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// `USER_QUEUE_CREATE` (14.2). Every address is a VA of the session's GPU
/// VM; none needs to be bound at creation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct UserQueueCreate {
    /// What the ring holds.
    pub kind: UserQueueKind,
    /// 0 (lowest) ..= 15.
    pub priority: u8,
    /// Ring base; a multiple of 256.
    pub ring: GpuVa,
    /// Ring size in bytes: a power of two in 4 KiB ..= 64 MiB.
    pub ring_size: u64,
    /// The `u64` read pointer the device writes.
    pub rptr: GpuVa,
    /// The `u64` write pointer the guest keeps, if any (informational: the
    /// device never reads it).
    pub wptr: Option<GpuVa>,
    /// The `u64` doorbell the guest stores to after writing packets.
    pub doorbell: GpuVa,
    /// The 64-byte status block the device writes when the queue stops.
    pub status: Option<GpuVa>,
}

impl UserQueueCreate {
    /// The byte ranges the queue touches: ring, rptr, wptr, doorbell and
    /// status block (absent ones are skipped), for the device's aperture
    /// check. Every range is known not to wrap for a decoded request.
    pub fn ranges(&self) -> impl Iterator<Item = (GpuVa, u64)> + '_ {
        [
            Some((self.ring, self.ring_size)),
            Some((self.rptr, 8)),
            self.wptr.map(|w| (w, 8)),
            Some((self.doorbell, 8)),
            self.status.map(|s| (s, STATUS_BLOCK_SIZE)),
        ]
        .into_iter()
        .flatten()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<UserQueueCreate, DecodeError> {
        exact_len(bytes, USER_QUEUE_CREATE_LEN)?;
        let raw_kind = u32_at(bytes, 16)?;
        let kind = UserQueueKind::from_u32(raw_kind).ok_or(DecodeError::InvalidValue {
            field: "kind",
            value: u64::from(raw_kind),
        })?;
        let raw_priority = u32_at(bytes, 20)?;
        let priority = u8::try_from(raw_priority)
            .ok()
            .filter(|p| *p <= crate::command::MAX_QUEUE_PRIORITY)
            .ok_or(DecodeError::InvalidValue {
                field: "priority",
                value: u64::from(raw_priority),
            })?;
        let ring_size = u64_at(bytes, 32)?;
        if !ring_size.is_power_of_two()
            || !(MIN_USER_RING_SIZE..=MAX_USER_RING_SIZE).contains(&ring_size)
        {
            return Err(DecodeError::InvalidValue {
                field: "ring_size",
                value: ring_size,
            });
        }
        let wptr = u64_at(bytes, 48)?;
        let status = u64_at(bytes, 64)?;
        let q = UserQueueCreate {
            kind,
            priority,
            ring: GpuVa(u64_at(bytes, 24)?),
            ring_size,
            rptr: GpuVa(u64_at(bytes, 40)?),
            wptr: (wptr != 0).then_some(GpuVa(wptr)),
            doorbell: GpuVa(u64_at(bytes, 56)?),
            status: (status != 0).then_some(GpuVa(status)),
        };
        let aligned = [
            ("ring_va", q.ring.raw(), USER_RING_ALIGN),
            ("rptr_va", q.rptr.raw(), QUEUE_POINTER_ALIGN),
            ("wptr_va", wptr, QUEUE_POINTER_ALIGN),
            ("doorbell_va", q.doorbell.raw(), QUEUE_POINTER_ALIGN),
            ("status_va", status, STATUS_BLOCK_ALIGN),
        ];
        for (field, value, align) in aligned {
            if value % align != 0 {
                return Err(DecodeError::Misaligned { field, value });
            }
        }
        let wraps = [
            ("ring_va+ring_size", q.ring, ring_size),
            ("rptr_va+8", q.rptr, 8),
            ("wptr_va+8", GpuVa(wptr), 8),
            ("doorbell_va+8", q.doorbell, 8),
            ("status_va+64", GpuVa(status), STATUS_BLOCK_SIZE),
        ];
        for (field, va, len) in wraps {
            va.checked_add(len).ok_or(DecodeError::Overflow { field })?;
        }
        Ok(q)
    }

    pub(crate) fn write(&self, buf: &mut [u8]) {
        put_u32(buf, 16, self.kind.as_u32());
        put_u32(buf, 20, u32::from(self.priority));
        put_u64(buf, 24, self.ring.raw());
        put_u64(buf, 32, self.ring_size);
        put_u64(buf, 40, self.rptr.raw());
        put_u64(buf, 48, self.wptr.map_or(0, GpuVa::raw));
        put_u64(buf, 56, self.doorbell.raw());
        put_u64(buf, 64, self.status.map_or(0, GpuVa::raw));
    }
}

/// `USER_QUEUE_DESTROY` (14.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct UserQueueDestroy {
    /// The queue.
    pub queue: QueueId,
}

impl UserQueueDestroy {
    pub(crate) fn decode(bytes: &[u8]) -> Result<UserQueueDestroy, DecodeError> {
        exact_len(bytes, USER_QUEUE_DESTROY_LEN)?;
        reserved_at(bytes, 20, 4, "reserved")?;
        Ok(UserQueueDestroy {
            queue: QueueId(u32_at(bytes, 16)?),
        })
    }

    pub(crate) fn write(&self, buf: &mut [u8]) {
        put_u32(buf, 16, self.queue.0);
    }
}

fn exact_len(bytes: &[u8], expected: usize) -> Result<(), DecodeError> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::WrongLength {
            expected,
            actual: bytes.len(),
        })
    }
}

/// `QUEUE_COUNTERS` reply payload (14.5): counters of the session's user
/// queues since the session started.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct QueueCountersReply {
    /// Packets that completed on user queues.
    pub user_queue_packets: u64,
    /// Bytes written by SDMA `COPY_LINEAR` and `CONST_FILL`.
    pub copy_bytes: u64,
    /// Interrupts raised (the fault ring header's `interrupts`, unwrapped).
    pub interrupts: u64,
    /// Doorbell loads the device did.
    pub doorbell_polls: u64,
}

/// Why a user queue stopped (the status block's `status`, 14.6). The
/// values 1 ..= 6 are those of [`DispatchStatus`]; 16 and up are for
/// packets and doorbells.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum QueueStopStatus {
    /// A fault of the queue was rejected by the guest.
    FaultRejected = 1,
    /// A fault of the queue was not answered in time.
    FaultTimedOut = 2,
    /// A fault that is never forwarded (NULL guard, reserved range, fatal
    /// policy, `ACCESS`).
    FaultFatal = 3,
    /// The device failed an access for another reason (a bound page that
    /// is no longer guest RAM).
    DeviceError = 5,
    /// Reserved: the value of `DispatchStatus::WatchdogTimeout`. User
    /// queues have no watchdog (a poll may legitimately wait forever); the
    /// value only keeps the two status spaces aligned.
    WatchdogTimeout = 6,
    /// An unknown or malformed packet.
    BadPacket = 16,
    /// A packet the device cannot execute (an AQL kernel dispatch: there
    /// is no gfx ISA on a simulated GPU).
    UnsupportedPacket = 17,
    /// The doorbell claimed more than a ring of unprocessed work, or went
    /// backwards (SDMA), or is not a multiple of 4 (SDMA).
    BadDoorbell = 18,
}

impl QueueStopStatus {
    /// Parses the wire value.
    pub const fn from_u32(v: u32) -> Option<QueueStopStatus> {
        Some(match v {
            1 => QueueStopStatus::FaultRejected,
            2 => QueueStopStatus::FaultTimedOut,
            3 => QueueStopStatus::FaultFatal,
            5 => QueueStopStatus::DeviceError,
            6 => QueueStopStatus::WatchdogTimeout,
            16 => QueueStopStatus::BadPacket,
            17 => QueueStopStatus::UnsupportedPacket,
            18 => QueueStopStatus::BadDoorbell,
            _ => return None,
        })
    }

    /// The wire value.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The stop status for a fault that ended with `status`; `None` for
    /// statuses that do not stop a queue (`OK`, `CANCELLED`: a cancelled
    /// queue is being destroyed and its block is not written).
    pub const fn from_dispatch(status: DispatchStatus) -> Option<QueueStopStatus> {
        match status {
            DispatchStatus::FaultRejected => Some(QueueStopStatus::FaultRejected),
            DispatchStatus::FaultTimedOut => Some(QueueStopStatus::FaultTimedOut),
            DispatchStatus::FaultFatal => Some(QueueStopStatus::FaultFatal),
            DispatchStatus::DeviceError => Some(QueueStopStatus::DeviceError),
            DispatchStatus::WatchdogTimeout => Some(QueueStopStatus::WatchdogTimeout),
            DispatchStatus::Ok | DispatchStatus::Cancelled => None,
        }
    }
}

/// The contents of a stopped queue's status block (14.6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct QueueStatusBlock {
    /// Why the queue stopped.
    pub status: QueueStopStatus,
    /// The faulting VA for the `FAULT_*` and `DEVICE_ERROR` statuses, else 0.
    pub fault_va: GpuVa,
    /// Where processing stopped: SDMA, the byte offset (the `rptr` unit) of
    /// the packet; AQL, the packet index.
    pub packet: u64,
    /// The access that faulted, for the `FAULT_*` statuses (0 on the wire
    /// otherwise).
    pub access: Option<AccessFlags>,
    /// `BAD_PACKET`/`UNSUPPORTED_PACKET`: the packet's first dword (SDMA)
    /// or its 16-bit header (AQL); `BAD_DOORBELL`: the doorbell value;
    /// otherwise 0.
    pub detail: u64,
}

impl QueueStatusBlock {
    /// The 64 bytes, `state` = stopped, reserved bytes zero. The device
    /// writes bytes 4..64 first and `state` (bytes 0..4) last, with release
    /// ordering.
    pub fn encode(&self) -> [u8; STATUS_BLOCK_SIZE as usize] {
        let mut b = [0u8; STATUS_BLOCK_SIZE as usize];
        put_u32(&mut b, STATUS_STATE_OFFSET as usize, QUEUE_STATE_STOPPED);
        put_u32(&mut b, STATUS_STATUS_OFFSET as usize, self.status.as_u32());
        put_u64(&mut b, STATUS_FAULT_VA_OFFSET as usize, self.fault_va.raw());
        put_u64(&mut b, STATUS_PACKET_OFFSET as usize, self.packet);
        put_u8(
            &mut b,
            STATUS_ACCESS_OFFSET as usize,
            self.access.map_or(0, AccessFlags::bits),
        );
        put_u64(&mut b, STATUS_DETAIL_OFFSET as usize, self.detail);
        b
    }

    /// Reads a status block (guest side): `None` while `state` is running,
    /// the block once stopped. A defined status and access, reserved bytes
    /// zero.
    pub fn decode(bytes: &[u8]) -> Result<Option<QueueStatusBlock>, DecodeError> {
        if bytes.len() < STATUS_BLOCK_SIZE as usize {
            return Err(DecodeError::TooShort {
                needed: STATUS_BLOCK_SIZE as usize,
                actual: bytes.len(),
            });
        }
        match u32_at(bytes, STATUS_STATE_OFFSET as usize)? {
            QUEUE_STATE_RUNNING => return Ok(None),
            QUEUE_STATE_STOPPED => {}
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "status.state",
                    value: u64::from(other),
                });
            }
        }
        let raw = u32_at(bytes, STATUS_STATUS_OFFSET as usize)?;
        let status = QueueStopStatus::from_u32(raw).ok_or(DecodeError::InvalidValue {
            field: "status.status",
            value: u64::from(raw),
        })?;
        let raw_access = u8_at(bytes, STATUS_ACCESS_OFFSET as usize)?;
        let access = match raw_access {
            0 => None,
            bits => Some(
                AccessFlags::from_bits(bits).ok_or(DecodeError::InvalidValue {
                    field: "status.access",
                    value: u64::from(bits),
                })?,
            ),
        };
        reserved_at(bytes, 25, 7, "status.reserved25")?;
        reserved_at(bytes, 40, 24, "status.reserved40")?;
        Ok(Some(QueueStatusBlock {
            status,
            fault_va: GpuVa(u64_at(bytes, STATUS_FAULT_VA_OFFSET as usize)?),
            packet: u64_at(bytes, STATUS_PACKET_OFFSET as usize)?,
            access,
            detail: u64_at(bytes, STATUS_DETAIL_OFFSET as usize)?,
        }))
    }
}
