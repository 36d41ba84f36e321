//! HSA AQL packets and the AMD signal ABI, as the device's packet processor
//! reads them (`docs/protocol.md` 14.9 and 14.10).
//!
//! An AQL ring is an array of 64-byte packets. The producer (ROCr) writes
//! a packet's body, then its first 32 bits (the 16-bit header and the
//! following 16 bits) with release ordering, then the doorbell; a slot
//! whose header type is `INVALID` is not yet written. Signals are
//! `amd_signal_t` objects (64 bytes, 64-aligned) in guest memory, named by
//! their address (`hsa_signal_t.handle`).

use crate::types::GpuVa;
use crate::uq::QueueStopStatus;
use crate::wire::{put_u16, put_u64, u16_at, u64_at};

/// Size of one packet.
pub const AQL_PACKET_SIZE: usize = 64;

/// Packet types (header bits 0..8).
pub mod packet_type {
    /// Vendor-specific; AMD's `PM4_IB` format is the one the device knows.
    pub const VENDOR_SPECIFIC: u8 = 0;
    /// Not yet written (or already processed).
    pub const INVALID: u8 = 1;
    /// A kernel launch.
    pub const KERNEL_DISPATCH: u8 = 2;
    /// Waits for all dependency signals.
    pub const BARRIER_AND: u8 = 3;
    /// A function for the agent (host) to run.
    pub const AGENT_DISPATCH: u8 = 4;
    /// Waits for any dependency signal.
    pub const BARRIER_OR: u8 = 5;
}

/// Header bit 8: the packet waits for all earlier packets.
pub const HEADER_BARRIER: u16 = 1 << 8;
/// Offset of the dependency signals of a barrier packet.
pub const DEP_SIGNAL_OFFSET: usize = 8;
/// Dependency signals of a barrier packet.
pub const DEP_SIGNALS: usize = 5;
/// Offset of the completion signal (every packet type).
pub const COMPLETION_SIGNAL_OFFSET: usize = 56;
/// Offset of the 16-bit AMD vendor format of a vendor-specific packet.
pub const VENDOR_FORMAT_OFFSET: usize = 2;
/// AMD vendor format: a PM4 indirect buffer (ROCr's `ExecutePM4`).
pub const AMD_AQL_FORMAT_PM4_IB: u16 = 1;
/// The header the processor writes into a slot it has processed.
pub const PROCESSED_HEADER: u16 = packet_type::INVALID as u16;

/// The AMD signal ABI (`amd_signal_t`, `amd_hsa_signal.h`).
pub mod amd_signal {
    /// Size of a signal.
    pub const SIZE: u64 = 64;
    /// Alignment of a signal.
    pub const ALIGN: u64 = 64;
    /// `kind: i64`.
    pub const KIND: u64 = 0;
    /// `value: i64`.
    pub const VALUE: u64 = 8;
    /// `event_mailbox_ptr: u64`: where the device stores `event_id`.
    pub const EVENT_MAILBOX_PTR: u64 = 16;
    /// `event_id: u32`.
    pub const EVENT_ID: u64 = 24;
    /// `start_ts: u64` (profiling; not written by this device).
    pub const START_TS: u64 = 32;
    /// `end_ts: u64` (profiling; not written by this device).
    pub const END_TS: u64 = 40;
    /// `kind` of a signal whose value lives in memory.
    pub const KIND_USER: i64 = 1;
}

/// Why a packet is not executed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AqlError {
    /// Unknown type, unknown vendor format, or a misaligned signal: the
    /// queue stops `BAD_PACKET`.
    Bad {
        /// The packet header.
        header: u16,
    },
    /// A packet the processor cannot run: the queue stops
    /// `UNSUPPORTED_PACKET`.
    Unsupported {
        /// The packet header.
        header: u16,
    },
}

impl AqlError {
    /// The status the queue stops with.
    pub const fn stop_status(&self) -> QueueStopStatus {
        match self {
            AqlError::Bad { .. } => QueueStopStatus::BadPacket,
            AqlError::Unsupported { .. } => QueueStopStatus::UnsupportedPacket,
        }
    }

    /// The header (the status block's `detail`).
    pub const fn header(&self) -> u16 {
        match self {
            AqlError::Bad { header } | AqlError::Unsupported { header } => *header,
        }
    }
}

/// A signal, by its `hsa_signal_t` handle (the `amd_signal_t` address).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SignalHandle(pub GpuVa);

impl SignalHandle {
    /// The VA of the signal's `value`.
    pub fn value_va(&self) -> GpuVa {
        GpuVa(self.0.raw().wrapping_add(amd_signal::VALUE))
    }

    /// The VA of a field of the signal.
    pub fn field(&self, offset: u64) -> GpuVa {
        GpuVa(self.0.raw().wrapping_add(offset))
    }

    fn decode(raw: u64, header: u16) -> Result<Option<SignalHandle>, AqlError> {
        if raw == 0 {
            return Ok(None);
        }
        if !raw.is_multiple_of(amd_signal::ALIGN) || raw.checked_add(amd_signal::SIZE).is_none() {
            return Err(AqlError::Bad { header });
        }
        Ok(Some(SignalHandle(GpuVa(raw))))
    }
}

/// Which dependency condition a barrier waits for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum BarrierKind {
    /// Every dependency signal is 0.
    And,
    /// At least one dependency signal is 0.
    Or,
}

/// One decoded packet.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AqlPacket {
    /// The slot is not yet written: the processor waits on it.
    Invalid,
    /// A barrier-AND or barrier-OR packet.
    Barrier {
        /// AND or OR.
        kind: BarrierKind,
        /// The dependency signals (handle 0 = none).
        deps: [Option<SignalHandle>; DEP_SIGNALS],
        /// Decremented when the packet completes.
        completion: Option<SignalHandle>,
    },
    /// AMD vendor packet `PM4_IB`: ROCr's code-cache invalidation. The
    /// simulated GPU has no caches and no PM4 engine: it completes as a
    /// no-op.
    Pm4Ib {
        /// Decremented when the packet completes.
        completion: Option<SignalHandle>,
    },
}

impl AqlPacket {
    /// Decodes a packet slot. A kernel or agent dispatch is
    /// [`AqlError::Unsupported`]; an unknown type or vendor format, or a
    /// signal handle that is not 64-aligned, is [`AqlError::Bad`].
    pub fn decode(bytes: &[u8; AQL_PACKET_SIZE]) -> Result<AqlPacket, AqlError> {
        let header = u16_at(bytes, 0).unwrap_or(0);
        let bad = AqlError::Bad { header };
        let completion =
            SignalHandle::decode(u64_at(bytes, COMPLETION_SIGNAL_OFFSET).unwrap_or(0), header);
        match (header & 0xFF) as u8 {
            packet_type::INVALID => Ok(AqlPacket::Invalid),
            packet_type::BARRIER_AND | packet_type::BARRIER_OR => {
                let kind = if (header & 0xFF) as u8 == packet_type::BARRIER_AND {
                    BarrierKind::And
                } else {
                    BarrierKind::Or
                };
                let mut deps = [None; DEP_SIGNALS];
                for (i, d) in deps.iter_mut().enumerate() {
                    let raw = u64_at(bytes, DEP_SIGNAL_OFFSET + 8 * i).unwrap_or(0);
                    *d = SignalHandle::decode(raw, header)?;
                }
                Ok(AqlPacket::Barrier {
                    kind,
                    deps,
                    completion: completion?,
                })
            }
            packet_type::VENDOR_SPECIFIC => {
                match u16_at(bytes, VENDOR_FORMAT_OFFSET).unwrap_or(0) {
                    AMD_AQL_FORMAT_PM4_IB => Ok(AqlPacket::Pm4Ib {
                        completion: completion?,
                    }),
                    _ => Err(bad),
                }
            }
            packet_type::KERNEL_DISPATCH | packet_type::AGENT_DISPATCH => {
                Err(AqlError::Unsupported { header })
            }
            _ => Err(bad),
        }
    }

    /// A barrier packet's 64 bytes (header with the barrier bit, as ROCr
    /// writes it).
    pub fn barrier(
        kind: BarrierKind,
        deps: &[GpuVa],
        completion: Option<GpuVa>,
    ) -> [u8; AQL_PACKET_SIZE] {
        let ty = match kind {
            BarrierKind::And => packet_type::BARRIER_AND,
            BarrierKind::Or => packet_type::BARRIER_OR,
        };
        let mut b = [0u8; AQL_PACKET_SIZE];
        put_u16(&mut b, 0, u16::from(ty) | HEADER_BARRIER);
        for (i, d) in deps.iter().take(DEP_SIGNALS).enumerate() {
            put_u64(&mut b, DEP_SIGNAL_OFFSET + 8 * i, d.raw());
        }
        put_u64(
            &mut b,
            COMPLETION_SIGNAL_OFFSET,
            completion.map_or(0, GpuVa::raw),
        );
        b
    }

    /// A packet of type `ty` with only a header and a completion signal
    /// (for kernel dispatches and other packets the processor refuses).
    pub fn with_type(ty: u8, completion: Option<GpuVa>) -> [u8; AQL_PACKET_SIZE] {
        let mut b = [0u8; AQL_PACKET_SIZE];
        put_u16(&mut b, 0, u16::from(ty));
        put_u64(
            &mut b,
            COMPLETION_SIGNAL_OFFSET,
            completion.map_or(0, GpuVa::raw),
        );
        b
    }

    /// AMD's `PM4_IB` vendor packet (ROCr's `ExecutePM4` on gfx9).
    pub fn pm4_ib(completion: Option<GpuVa>) -> [u8; AQL_PACKET_SIZE] {
        let mut b = Self::with_type(packet_type::VENDOR_SPECIFIC, completion);
        put_u16(&mut b, VENDOR_FORMAT_OFFSET, AMD_AQL_FORMAT_PM4_IB);
        b
    }
}
