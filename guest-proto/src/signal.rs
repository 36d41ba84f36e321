//! Memory-based completion signals.
//!
//! A completion signal is a 32-byte slot in guest memory that the device
//! writes when a dispatch ends, the way HSA signals work: the guest never has
//! to hold a virtio-gpu fence for long-running or fault-stalled work, it
//! polls (or, in the native profile, waits for an event and then reads).
//!
//! Layout of a slot, little-endian, 32-byte aligned:
//!
//! | offset | size | field      | written by |
//! |--------|------|------------|------------|
//! | 0      | 8    | `value`    | device, last, with release ordering |
//! | 8      | 4    | `status`   | device ([`DispatchStatus`]) |
//! | 12     | 4    | reserved   | device writes 0 |
//! | 16     | 8    | `error_va` | device: the faulting GPU VA, or 0 |
//! | 24     | 8    | reserved   | device writes 0 |
//!
//! The guest reads `value` with acquire ordering; once it equals the
//! completion value of the dispatch, `status` and `error_va` are valid.

use crate::error::DecodeError;
use crate::types::{GpuVa, SignalIndex};
use crate::wire::{put_u32, put_u64, reserved_at, u32_at, u64_at};

/// Size of one signal slot in bytes.
pub const SIGNAL_SLOT_SIZE: u64 = 32;
/// Offset of `value` in a slot.
pub const SIGNAL_VALUE_OFFSET: u64 = 0;
/// Offset of `status` in a slot.
pub const SIGNAL_STATUS_OFFSET: u64 = 8;
/// Offset of `error_va` in a slot.
pub const SIGNAL_ERROR_VA_OFFSET: u64 = 16;

/// How a dispatch ended, as written to its signal's `status` field.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum DispatchStatus {
    /// Every work item ran.
    Ok = 0,
    /// A fault of this dispatch was rejected by the guest.
    FaultRejected = 1,
    /// A fault of this dispatch was not answered within the fault timeout.
    FaultTimedOut = 2,
    /// A fault hit a range with the fatal policy, the reserved range, or an
    /// access the range's attributes forbid; it was never forwarded.
    FaultFatal = 3,
    /// The queue or the context was destroyed before the dispatch ended.
    Cancelled = 4,
    /// The device failed the dispatch for another reason (for example a
    /// bound page that is no longer guest RAM).
    DeviceError = 5,
    /// The dispatch used more device time than the device's watchdog
    /// allows (a runaway kernel) and was killed; time stalled on faults or
    /// waiting for a compute unit does not count.
    WatchdogTimeout = 6,
}

impl DispatchStatus {
    /// Parses the wire value.
    pub const fn from_u32(v: u32) -> Option<DispatchStatus> {
        Some(match v {
            0 => DispatchStatus::Ok,
            1 => DispatchStatus::FaultRejected,
            2 => DispatchStatus::FaultTimedOut,
            3 => DispatchStatus::FaultFatal,
            4 => DispatchStatus::Cancelled,
            5 => DispatchStatus::DeviceError,
            6 => DispatchStatus::WatchdogTimeout,
            _ => return None,
        })
    }
}

/// Offset of slot `index` in the signal area.
pub const fn signal_slot_offset(index: SignalIndex) -> u64 {
    index.0 as u64 * SIGNAL_SLOT_SIZE
}

/// The contents of a signal slot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SignalSlot {
    /// The completion value of the dispatch that ended.
    pub value: u64,
    /// How it ended.
    pub status: DispatchStatus,
    /// The faulting VA for `FAULT_*` statuses, else 0.
    pub error_va: GpuVa,
}

impl SignalSlot {
    /// The 32 bytes of the slot, reserved fields zero. The device stores
    /// `value` (bytes 0..8) last, with release ordering.
    pub fn encode(&self) -> [u8; SIGNAL_SLOT_SIZE as usize] {
        let mut b = [0u8; SIGNAL_SLOT_SIZE as usize];
        put_u64(&mut b, SIGNAL_VALUE_OFFSET as usize, self.value);
        put_u32(&mut b, SIGNAL_STATUS_OFFSET as usize, self.status as u32);
        put_u64(&mut b, SIGNAL_ERROR_VA_OFFSET as usize, self.error_va.raw());
        b
    }

    /// Reads a slot: a defined status, reserved fields zero.
    pub fn decode(bytes: &[u8]) -> Result<SignalSlot, DecodeError> {
        if bytes.len() < SIGNAL_SLOT_SIZE as usize {
            return Err(DecodeError::TooShort {
                needed: SIGNAL_SLOT_SIZE as usize,
                actual: bytes.len(),
            });
        }
        let raw_status = u32_at(bytes, SIGNAL_STATUS_OFFSET as usize)?;
        reserved_at(bytes, 12, 4, "signal.reserved12")?;
        reserved_at(bytes, 24, 8, "signal.reserved24")?;
        Ok(SignalSlot {
            value: u64_at(bytes, SIGNAL_VALUE_OFFSET as usize)?,
            status: DispatchStatus::from_u32(raw_status).ok_or(DecodeError::InvalidValue {
                field: "signal.status",
                value: u64::from(raw_status),
            })?,
            error_va: GpuVa(u64_at(bytes, SIGNAL_ERROR_VA_OFFSET as usize)?),
        })
    }
}
