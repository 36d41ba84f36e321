//! gfx9 SDMA packets, as the device's copy engine executes them
//! (`docs/protocol.md` 14.8).
//!
//! The layouts are those of the gfx9 SDMA engine (`sdma_v4_0`) that ROCm's
//! runtime (ROCr 5.2, `BlitSdmaV4`) writes: little-endian dwords, the
//! opcode in bits 0..8 of the first dword and the sub-opcode in bits 8..16.
//! [`packet_dwords`] says how long the packet at a ring position is from its
//! first dword alone, so the engine knows how much to fetch;
//! [`SdmaPacket::decode`] then checks every field the engine interprets.
//! Decoding never panics: a packet the engine does not know is
//! [`SdmaError::Bad`], one it knows but does not execute is
//! [`SdmaError::Unsupported`].

use alloc::vec::Vec;

use crate::types::GpuVa;
use crate::uq::QueueStopStatus;

/// Opcodes (first dword, bits 0..8).
pub mod opcode {
    /// No operation; bits 16..30 of the first dword count extra dwords.
    pub const NOP: u8 = 0;
    /// Copies (sub-opcode selects the kind).
    pub const COPY: u8 = 1;
    /// Linear write of inline data.
    pub const WRITE: u8 = 2;
    /// Indirect buffer.
    pub const INDIRECT: u8 = 4;
    /// Semaphore.
    pub const SEMAPHORE: u8 = 3;
    /// Writes a 32-bit value to memory.
    pub const FENCE: u8 = 5;
    /// Raises an interrupt.
    pub const TRAP: u8 = 6;
    /// Register write.
    pub const SRBM_WRITE: u8 = 7;
    /// Waits for a register or memory value.
    pub const POLL_REGMEM: u8 = 8;
    /// Conditional execution.
    pub const COND_EXE: u8 = 9;
    /// Atomic read-modify-write.
    pub const ATOMIC: u8 = 10;
    /// Fills memory with a constant.
    pub const CONST_FILL: u8 = 11;
    /// Page-table entry generation.
    pub const GEN_PTEPDE: u8 = 12;
    /// Timestamps.
    pub const TIMESTAMP: u8 = 13;
    /// Cache control (gfx10).
    pub const GCR: u8 = 17;
}

/// Sub-opcodes (first dword, bits 8..16).
pub mod sub_op {
    /// `COPY`: linear to linear.
    pub const COPY_LINEAR: u8 = 0;
    /// `COPY`: linear sub-window (rectangle).
    pub const COPY_LINEAR_RECT: u8 = 4;
    /// `TIMESTAMP`: set the local counter.
    pub const TIMESTAMP_SET_LOCAL: u8 = 0;
    /// `TIMESTAMP`: write the local counter.
    pub const TIMESTAMP_GET_LOCAL: u8 = 1;
    /// `TIMESTAMP`: write the global counter.
    pub const TIMESTAMP_GET_GLOBAL: u8 = 2;
}

/// Most bytes one `COPY_LINEAR` moves (a 22-bit `count` of bytes - 1).
pub const MAX_COPY_BYTES: u64 = 1 << 22;
/// Most bytes one `CONST_FILL` writes.
pub const MAX_FILL_BYTES: u64 = 1 << 22;
/// `POLL_REGMEM` `retry_count` meaning "forever" (the only behaviour the
/// device implements, 14.8).
pub const POLL_RETRY_FOREVER: u32 = 0xFFF;

/// Why a packet is not executed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SdmaError {
    /// Unknown opcode or a malformed field: the queue stops `BAD_PACKET`.
    Bad {
        /// The packet's first dword.
        header: u32,
    },
    /// A packet the engine knows but does not execute: the queue stops
    /// `UNSUPPORTED_PACKET`.
    Unsupported {
        /// The packet's first dword.
        header: u32,
    },
}

impl SdmaError {
    /// The status the queue stops with.
    pub const fn stop_status(&self) -> QueueStopStatus {
        match self {
            SdmaError::Bad { .. } => QueueStopStatus::BadPacket,
            SdmaError::Unsupported { .. } => QueueStopStatus::UnsupportedPacket,
        }
    }

    /// The packet's first dword (the status block's `detail`).
    pub const fn header(&self) -> u32 {
        match self {
            SdmaError::Bad { header } | SdmaError::Unsupported { header } => *header,
        }
    }
}

const fn op_of(header: u32) -> u8 {
    (header & 0xFF) as u8
}

const fn sub_op_of(header: u32) -> u8 {
    ((header >> 8) & 0xFF) as u8
}

const fn bits(v: u32, shift: u32, width: u32) -> u32 {
    (v >> shift) & ((1 << width) - 1)
}

/// The length in dwords of the packet whose first dword is `header`, for
/// the packets the engine executes.
pub const fn packet_dwords(header: u32) -> Result<u32, SdmaError> {
    let bad = SdmaError::Bad { header };
    let unsupported = SdmaError::Unsupported { header };
    match op_of(header) {
        opcode::NOP => {
            if bits(header, 30, 2) != 0 {
                return Err(bad);
            }
            Ok(1 + bits(header, 16, 14))
        }
        opcode::COPY => match sub_op_of(header) {
            sub_op::COPY_LINEAR => Ok(7),
            // Tiled, rectangle, broadcast, ... copies exist on gfx9.
            1..=7 => Err(unsupported),
            _ => Err(bad),
        },
        opcode::FENCE => Ok(4),
        opcode::TRAP => Ok(2),
        opcode::POLL_REGMEM => Ok(6),
        opcode::ATOMIC => Ok(8),
        opcode::CONST_FILL => Ok(5),
        opcode::TIMESTAMP => match sub_op_of(header) {
            sub_op::TIMESTAMP_GET_LOCAL | sub_op::TIMESTAMP_GET_GLOBAL => Ok(3),
            sub_op::TIMESTAMP_SET_LOCAL => Err(unsupported),
            _ => Err(bad),
        },
        opcode::WRITE
        | opcode::SEMAPHORE
        | opcode::INDIRECT
        | opcode::SRBM_WRITE
        | opcode::COND_EXE
        | opcode::GEN_PTEPDE
        | opcode::GCR => Err(unsupported),
        _ => Err(bad),
    }
}

/// The comparison of a memory `POLL_REGMEM`: `(value & mask) <func>
/// reference`, unsigned.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum PollFunc {
    /// Always true.
    Always = 0,
    /// `<`
    Less = 1,
    /// `<=`
    LessEqual = 2,
    /// `==`
    Equal = 3,
    /// `!=`
    NotEqual = 4,
    /// `>=`
    GreaterEqual = 5,
    /// `>`
    Greater = 6,
}

impl PollFunc {
    /// Parses the 3-bit `func` field (7 is reserved).
    pub const fn from_bits(v: u32) -> Option<PollFunc> {
        Some(match v {
            0 => PollFunc::Always,
            1 => PollFunc::Less,
            2 => PollFunc::LessEqual,
            3 => PollFunc::Equal,
            4 => PollFunc::NotEqual,
            5 => PollFunc::GreaterEqual,
            6 => PollFunc::Greater,
            _ => return None,
        })
    }

    /// Whether the condition holds for the masked memory value.
    pub const fn holds(self, masked: u32, reference: u32) -> bool {
        match self {
            PollFunc::Always => true,
            PollFunc::Less => masked < reference,
            PollFunc::LessEqual => masked <= reference,
            PollFunc::Equal => masked == reference,
            PollFunc::NotEqual => masked != reference,
            PollFunc::GreaterEqual => masked >= reference,
            PollFunc::Greater => masked > reference,
        }
    }
}

/// The operation of an `ATOMIC` packet (the gfx9 `TC_OP` encoding).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AtomicOp {
    /// `*addr = src`
    Swap,
    /// `if *addr == cmp { *addr = src }`
    CmpSwap,
    /// `*addr += src` (wrapping)
    Add,
    /// `*addr -= src` (wrapping)
    Sub,
    /// signed minimum
    SMin,
    /// unsigned minimum
    UMin,
    /// signed maximum
    SMax,
    /// unsigned maximum
    UMax,
    /// `&=`
    And,
    /// `|=`
    Or,
    /// `^=`
    Xor,
    /// `*addr = if *addr >= src { 0 } else { *addr + 1 }`
    Inc,
    /// `*addr = if *addr == 0 || *addr > src { src } else { *addr - 1 }`
    Dec,
}

/// `ATOMIC` `operation` of a 64-bit add with return: what ROCr uses to
/// decrement a completion signal.
pub const ATOMIC_ADD64: u8 = 47;

const ATOMIC_OPS: [(u8, AtomicOp); 13] = [
    (0x00, AtomicOp::Swap),
    (0x01, AtomicOp::CmpSwap),
    (0x08, AtomicOp::Add),
    (0x09, AtomicOp::Sub),
    (0x0A, AtomicOp::SMin),
    (0x0B, AtomicOp::UMin),
    (0x0C, AtomicOp::SMax),
    (0x0D, AtomicOp::UMax),
    (0x0E, AtomicOp::And),
    (0x0F, AtomicOp::Or),
    (0x10, AtomicOp::Xor),
    (0x11, AtomicOp::Inc),
    (0x12, AtomicOp::Dec),
];

/// One of the SDMA atomics on a word of either width: the same operations,
/// written once.
macro_rules! atomic_op_on {
    ($name:ident, $word:ty) => {
        fn $name(self, old: $word, src: $word, cmp: $word) -> $word {
            match self {
                AtomicOp::Swap => src,
                AtomicOp::CmpSwap => {
                    if old == cmp {
                        src
                    } else {
                        old
                    }
                }
                AtomicOp::Add => old.wrapping_add(src),
                AtomicOp::Sub => old.wrapping_sub(src),
                AtomicOp::SMin => old.cast_signed().min(src.cast_signed()).cast_unsigned(),
                AtomicOp::UMin => old.min(src),
                AtomicOp::SMax => old.cast_signed().max(src.cast_signed()).cast_unsigned(),
                AtomicOp::UMax => old.max(src),
                AtomicOp::And => old & src,
                AtomicOp::Or => old | src,
                AtomicOp::Xor => old ^ src,
                AtomicOp::Inc => {
                    if old >= src {
                        0
                    } else {
                        old + 1
                    }
                }
                AtomicOp::Dec => {
                    if old == 0 || old > src {
                        src
                    } else {
                        old - 1
                    }
                }
            }
        }
    };
}

impl AtomicOp {
    /// Decodes the 7-bit `operation`: the 32-bit (0x07 ..= 0x19) and 64-bit
    /// (0x27 ..= 0x39) forms with return, and the same without return
    /// (+ 0x40). Returns the operation and whether it is 64-bit.
    pub fn from_code(code: u32) -> Option<(AtomicOp, bool)> {
        let (base, wide) = match code {
            0x07..=0x19 => (0x07, false),
            0x27..=0x39 => (0x27, true),
            0x47..=0x59 => (0x47, false),
            0x67..=0x79 => (0x67, true),
            _ => return None,
        };
        let off = u8::try_from(code - base).ok()?;
        ATOMIC_OPS
            .iter()
            .find(|(o, _)| *o == off)
            .map(|(_, op)| (*op, wide))
    }

    /// The code with return, as ROCr writes it.
    pub fn code(self, wide: bool) -> u8 {
        let off = ATOMIC_OPS
            .iter()
            .find(|(_, op)| *op == self)
            .map_or(0, |(o, _)| *o);
        off + if wide { 0x27 } else { 0x07 }
    }

    /// The new memory value for the old one (`wide`: 64-bit, else the low
    /// 32 bits of every operand).
    pub fn apply(self, old: u64, src: u64, cmp: u64, wide: bool) -> u64 {
        if wide {
            self.apply64(old, src, cmp)
        } else {
            let r = self.apply32(old as u32, src as u32, cmp as u32);
            u64::from(r)
        }
    }

    atomic_op_on!(apply64, u64);
    atomic_op_on!(apply32, u32);
}

/// One decoded SDMA packet.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SdmaPacket {
    /// Skips `dwords` dwords (itself included).
    Nop {
        /// Length of the packet in dwords, at least 1.
        dwords: u32,
    },
    /// Copies `bytes` bytes from `src` to `dst`.
    CopyLinear {
        /// Source.
        src: GpuVa,
        /// Destination.
        dst: GpuVa,
        /// 1 ..= 4 MiB.
        bytes: u64,
    },
    /// Writes `elements` copies of the low `1 << element_shift` bytes of
    /// `data` from `dst` on.
    ConstFill {
        /// Destination, aligned to the element size.
        dst: GpuVa,
        /// The value (little-endian; its low bytes for smaller elements).
        data: u32,
        /// log2 of the element size: 0, 1 or 2.
        element_shift: u8,
        /// At least 1.
        elements: u64,
    },
    /// A register poll (or the HDP flush ROCr sends as one): there are no
    /// registers on a simulated GPU and nothing to flush, so it completes
    /// at once.
    PollRegister,
    /// Waits until `(*addr & mask) <func> reference` (a 32-bit load).
    PollMemory {
        /// 4-aligned.
        addr: GpuVa,
        /// Compared value.
        reference: u32,
        /// Applied to the loaded value.
        mask: u32,
        /// The comparison.
        func: PollFunc,
    },
    /// One atomic read-modify-write.
    Atomic {
        /// The operation.
        op: AtomicOp,
        /// 64-bit (8-aligned address) or 32-bit (4-aligned).
        wide: bool,
        /// Target.
        addr: GpuVa,
        /// Source operand.
        src: u64,
        /// Compare operand (`CmpSwap`).
        cmp: u64,
    },
    /// Writes `data` (32 bits) at `addr`.
    Fence {
        /// 4-aligned.
        addr: GpuVa,
        /// The value.
        data: u32,
    },
    /// Raises an interrupt with context `int_ctx`.
    Trap {
        /// 28 bits (ROCr puts the event id here).
        int_ctx: u32,
    },
    /// Writes the device's 64-bit timestamp (nanoseconds) at `addr`.
    Timestamp {
        /// 8-aligned.
        addr: GpuVa,
    },
}

fn dw(dws: &[u32], i: usize) -> u32 {
    dws.get(i).copied().unwrap_or(0)
}

fn addr(dws: &[u32], lo: usize) -> GpuVa {
    GpuVa(u64::from(dw(dws, lo)) | (u64::from(dw(dws, lo + 1)) << 32))
}

impl SdmaPacket {
    /// Decodes the packet in `dws`, which must be exactly
    /// [`packet_dwords`] long.
    pub fn decode(dws: &[u32]) -> Result<SdmaPacket, SdmaError> {
        let header = dw(dws, 0);
        let len = packet_dwords(header)?;
        let bad = SdmaError::Bad { header };
        let unsupported = SdmaError::Unsupported { header };
        if dws.len() != len as usize {
            return Err(bad);
        }
        let packet = match op_of(header) {
            opcode::NOP => SdmaPacket::Nop { dwords: len },
            opcode::COPY => {
                let count = dw(dws, 1);
                if count >> 22 != 0 {
                    return Err(bad);
                }
                let params = dw(dws, 2);
                // dst_swap (bits 16..18) and src_swap (24..26): byte swapping.
                if bits(params, 16, 2) != 0 || bits(params, 24, 2) != 0 {
                    return Err(unsupported);
                }
                SdmaPacket::CopyLinear {
                    src: addr(dws, 3),
                    dst: addr(dws, 5),
                    bytes: u64::from(count) + 1,
                }
            }
            opcode::CONST_FILL => {
                // sw (bits 16..18): byte swapping.
                if bits(header, 16, 2) != 0 {
                    return Err(unsupported);
                }
                let shift = bits(header, 30, 2);
                if shift > 2 {
                    return Err(bad);
                }
                let count = dw(dws, 4);
                if count >> 22 != 0 {
                    return Err(bad);
                }
                let dst = addr(dws, 1);
                if !dst.raw().is_multiple_of(1 << shift) {
                    return Err(bad);
                }
                SdmaPacket::ConstFill {
                    dst,
                    data: dw(dws, 3),
                    element_shift: shift as u8,
                    elements: u64::from(count >> shift) + 1,
                }
            }
            opcode::POLL_REGMEM => {
                if bits(header, 31, 1) == 0 {
                    SdmaPacket::PollRegister
                } else {
                    let func = PollFunc::from_bits(bits(header, 28, 3)).ok_or(bad)?;
                    let a = addr(dws, 1);
                    if !a.raw().is_multiple_of(4) {
                        return Err(bad);
                    }
                    SdmaPacket::PollMemory {
                        addr: a,
                        reference: dw(dws, 3),
                        mask: dw(dws, 4),
                        func,
                    }
                }
            }
            opcode::ATOMIC => {
                // `l`: loop until the compare succeeds.
                if bits(header, 16, 1) != 0 {
                    return Err(unsupported);
                }
                let (op, wide) = AtomicOp::from_code(bits(header, 25, 7)).ok_or(bad)?;
                let a = addr(dws, 1);
                if !a.raw().is_multiple_of(if wide { 8 } else { 4 }) {
                    return Err(bad);
                }
                SdmaPacket::Atomic {
                    op,
                    wide,
                    addr: a,
                    src: addr(dws, 3).raw(),
                    cmp: addr(dws, 5).raw(),
                }
            }
            opcode::FENCE => {
                let a = addr(dws, 1);
                if !a.raw().is_multiple_of(4) {
                    return Err(bad);
                }
                SdmaPacket::Fence {
                    addr: a,
                    data: dw(dws, 3),
                }
            }
            opcode::TRAP => SdmaPacket::Trap {
                int_ctx: dw(dws, 1) & 0x0FFF_FFFF,
            },
            opcode::TIMESTAMP => {
                let a = addr(dws, 1);
                if !a.raw().is_multiple_of(8) {
                    return Err(bad);
                }
                SdmaPacket::Timestamp { addr: a }
            }
            _ => return Err(bad),
        };
        Ok(packet)
    }

    /// Length in dwords.
    pub fn dwords(&self) -> u32 {
        match self {
            SdmaPacket::Nop { dwords } => (*dwords).max(1),
            SdmaPacket::CopyLinear { .. } => 7,
            SdmaPacket::ConstFill { .. } => 5,
            SdmaPacket::PollRegister | SdmaPacket::PollMemory { .. } => 6,
            SdmaPacket::Atomic { .. } => 8,
            SdmaPacket::Fence { .. } => 4,
            SdmaPacket::Trap { .. } => 2,
            SdmaPacket::Timestamp { .. } => 3,
        }
    }

    /// The packet's dwords, laid out as ROCr and Linux write them (a
    /// `CONST_FILL` count of bytes - 1, a `POLL_REGMEM` retrying forever
    /// every 4 units). Fields out of their domain are truncated to their
    /// width; [`SdmaPacket::decode`] of the result is `self` for every
    /// packet `decode` can produce.
    pub fn encode(&self) -> Vec<u32> {
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match *self {
            SdmaPacket::Nop { dwords } => {
                let n = dwords.clamp(1, 1 << 14);
                let mut v = alloc::vec![0u32; n as usize];
                if let Some(h) = v.first_mut() {
                    *h = u32::from(opcode::NOP) | (((n - 1) & 0x3FFF) << 16);
                }
                v
            }
            SdmaPacket::CopyLinear { src, dst, bytes } => alloc::vec![
                u32::from(opcode::COPY) | (u32::from(sub_op::COPY_LINEAR) << 8),
                (bytes.saturating_sub(1) as u32) & 0x3F_FFFF,
                0,
                lo(src.raw()),
                hi(src.raw()),
                lo(dst.raw()),
                hi(dst.raw()),
            ],
            SdmaPacket::ConstFill {
                dst,
                data,
                element_shift,
                elements,
            } => {
                let shift = u32::from(element_shift & 3);
                let bytes = elements.saturating_mul(1 << shift);
                alloc::vec![
                    u32::from(opcode::CONST_FILL) | (shift << 30),
                    lo(dst.raw()),
                    hi(dst.raw()),
                    data,
                    (bytes.saturating_sub(1) as u32) & 0x3F_FFFF,
                ]
            }
            SdmaPacket::PollRegister => {
                alloc::vec![u32::from(opcode::POLL_REGMEM), 0, 0x8000_0000, 0, 0, 0]
            }
            SdmaPacket::PollMemory {
                addr,
                reference,
                mask,
                func,
            } => alloc::vec![
                u32::from(opcode::POLL_REGMEM) | ((func as u32) << 28) | (1 << 31),
                lo(addr.raw()),
                hi(addr.raw()),
                reference,
                mask,
                4 | (POLL_RETRY_FOREVER << 16),
            ],
            SdmaPacket::Atomic {
                op,
                wide,
                addr,
                src,
                cmp,
            } => alloc::vec![
                u32::from(opcode::ATOMIC) | (u32::from(op.code(wide)) << 25),
                lo(addr.raw()),
                hi(addr.raw()),
                lo(src),
                hi(src),
                lo(cmp),
                hi(cmp),
                0,
            ],
            SdmaPacket::Fence { addr, data } => alloc::vec![
                u32::from(opcode::FENCE),
                lo(addr.raw()),
                hi(addr.raw()),
                data
            ],
            SdmaPacket::Trap { int_ctx } => {
                alloc::vec![u32::from(opcode::TRAP), int_ctx & 0x0FFF_FFFF]
            }
            SdmaPacket::Timestamp { addr } => alloc::vec![
                u32::from(opcode::TIMESTAMP) | (u32::from(sub_op::TIMESTAMP_GET_GLOBAL) << 8),
                lo(addr.raw()),
                hi(addr.raw()),
            ],
        }
    }

    /// The encoded packet as little-endian bytes.
    pub fn encode_bytes(&self) -> Vec<u8> {
        self.encode().iter().flat_map(|d| d.to_le_bytes()).collect()
    }
}
