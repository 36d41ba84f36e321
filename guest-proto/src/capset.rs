//! The capset: what the device tells a guest before any session exists.
//!
//! The guest reads it with `DRM_IOCTL_VIRTGPU_GET_CAPS` to decide whether
//! this is our device at all (the payload magic, because capset ids are not
//! yet allocated upstream), which optional capabilities it has, the GPU VA
//! layout, and the limits of the running daemon. `docs/protocol.md`
//! section 2.
//!
//! Decoding is lenient where the protocol asks for it: a newer minor version
//! may report a longer payload, set feature bits this version does not know,
//! and use fields that are reserved today, so the decoder accepts all of
//! that and keeps only what version 1.1 defines (a 1.0 device has zeros in
//! the fields 1.1 added).

use crate::error::DecodeError;
use crate::kernel::ALL_KERNELS_MASK;
use crate::types::{GpuVa, PAGE_SHIFT};
use crate::wire::{put_u8, put_u16, put_u32, put_u64, u8_at, u16_at, u32_at, u64_at};

/// The capset id this protocol uses unless the daemon is told otherwise.
pub const VGNC_CAPSET_ID: u32 = 24;
/// The highest capset version the device reports.
pub const CAPSET_MAX_VERSION: u32 = 1;
/// Size of the version 1 payload.
pub const CAPSET_SIZE: usize = 128;
/// The payload's first four bytes: "VGNC" in little-endian order.
pub const CAPSET_MAGIC: u32 = 0x434E_4756;
/// The protocol major version this crate speaks.
pub const VERSION_MAJOR: u16 = 1;
/// The protocol minor version this crate speaks: 1.1 adds faults
/// resolved by the guest kernel (section 15) and user-mode queues
/// (section 14).
pub const VERSION_MINOR: u16 = 1;

/// Width of a GPU VA on the simulated GPU.
pub const DEFAULT_VA_BITS: u8 = 48;
/// First VA a guest may bind: below it is the NULL guard.
pub const DEFAULT_APERTURE_START: GpuVa = GpuVa(0x1_0000);
/// First VA past the guest aperture: 2^47, the end of x86-64 user space.
pub const DEFAULT_APERTURE_END: GpuVa = GpuVa(1 << 47);
/// Start of the device-reserved range.
pub const DEFAULT_RESERVED_START: GpuVa = GpuVa(1 << 47);
/// End of the device-reserved range.
pub const DEFAULT_RESERVED_END: GpuVa = GpuVa(1 << 48);
/// Default largest `SUBMIT_3D` payload.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 1 << 20;
/// Default ops per `VM_BIND`.
pub const DEFAULT_MAX_BIND_OPS: u32 = 4096;
/// Default queues per session.
pub const DEFAULT_MAX_QUEUES: u32 = 16;
/// Default dispatches queued or running per queue.
pub const DEFAULT_MAX_QUEUE_DEPTH: u32 = 256;
/// Default sessions per guest.
pub const DEFAULT_MAX_CONTEXTS: u32 = 64;
/// Default faults pending per session.
pub const DEFAULT_MAX_PENDING_FAULTS: u32 = 4096;
/// Default bytes bound in GPU VMs per guest: 64 GiB. A ROCm job binds its
/// working set (tens of GiB on real GPUs), so a few GiB fails real jobs;
/// binding costs the host 8 bytes of page table per 4 KiB page (1/512), and
/// 8 more for a binding of a guest-physical page list, so a guest at the
/// limit costs the host 128 to 256 MiB.
pub const DEFAULT_MAX_BOUND_BYTES: u64 = 64 << 30;
/// Default fault timeout.
pub const DEFAULT_FAULT_TIMEOUT_MS: u32 = 10_000;
/// Default slots per signal area.
pub const DEFAULT_MAX_SIGNAL_SLOTS: u32 = 65_536;
/// Default capacity limit of a fault ring.
pub const DEFAULT_MAX_FAULT_RING_RECORDS: u32 = 65_536;
/// Default user queues per session (1.1).
pub const DEFAULT_MAX_USER_QUEUES: u32 = 16;

/// The capset's `features` bit set. Unknown bits are kept, so a guest can
/// still see them, but [`Features::contains`] only ever asks about one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Features(u32);

impl Features {
    /// No optional capability.
    pub const NONE: Features = Features(0);
    /// Faults stall and are forwarded to the guest.
    pub const RECOVERABLE_FAULTS: Features = Features(1 << 0);
    /// `RANGE_ATTR` is supported.
    pub const RANGE_ATTRS: Features = Features(1 << 1);
    /// `VM_BIND` accepts `MAP_PAGES`.
    pub const BIND_PAGES: Features = Features(1 << 2);
    /// The `PREFAULT` range attribute posts prefault records.
    pub const PREFAULT: Features = Features(1 << 3);
    /// 1.1: `SVM_ATTACH`/`SVM_DETACH`, faults resolved by the guest kernel
    /// (section 15).
    pub const KERNEL_SVM: Features = Features(1 << 4);
    /// 1.1: `USER_QUEUE_CREATE`, `USER_QUEUE_DESTROY`, `DOORBELL_KICK` and
    /// `QUEUE_COUNTERS` exist (section 14).
    pub const USER_QUEUES: Features = Features(1 << 5);
    /// Every bit this crate implements.
    pub const ALL: Features = Features(0x3F);

    /// The bit set as the wire carries it, unknown bits included.
    pub const fn from_bits_retain(bits: u32) -> Features {
        Features(bits)
    }

    /// The wire bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two sets.
    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }
}

/// The version 1 capset payload (section 2.2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Capset {
    /// The device's minor version (the major version is always 1 here).
    pub version_minor: u16,
    /// Optional capabilities.
    pub features: Features,
    /// Width of a GPU VA.
    pub va_bits: u8,
    /// log2 of the page size.
    pub page_shift: u8,
    /// Number of compute units.
    pub compute_units: u32,
    /// Bit `n`: pages of `2^n` bytes can be mapped.
    pub page_sizes: u64,
    /// First VA a guest may bind.
    pub aperture_start: GpuVa,
    /// First VA past the aperture.
    pub aperture_end: GpuVa,
    /// Start of the device-reserved range.
    pub reserved_start: GpuVa,
    /// End of the device-reserved range.
    pub reserved_end: GpuVa,
    /// Bit `1 << kernel id` for every kernel supported.
    pub kernels: u64,
    /// Queues per session.
    pub max_queues: u32,
    /// Dispatches queued or running per queue.
    pub max_queue_depth: u32,
    /// Sessions per guest.
    pub max_contexts: u32,
    /// Faults pending per session.
    pub max_pending_faults: u32,
    /// Bytes bound in GPU VMs per guest.
    pub max_bound_bytes: u64,
    /// Largest `SUBMIT_3D` payload.
    pub max_request_bytes: u32,
    /// Ops per `VM_BIND`.
    pub max_bind_ops: u32,
    /// A fault not answered within this ends as timed out.
    pub fault_timeout_ms: u32,
    /// Slots per signal area.
    pub max_signal_slots: u32,
    /// Capacity limit of a fault ring.
    pub max_fault_ring_records: u32,
    /// 1.1: bit `1 << kind` for every user queue kind the device runs
    /// (`uq::UserQueueKind`); 0 on a 1.0 device.
    pub user_queue_kinds: u32,
    /// 1.1: user queues per session; 0 on a 1.0 device.
    pub max_user_queues: u32,
}

impl Default for Capset {
    /// The simulated GPU with the defaults of section 12: every feature,
    /// every kernel, one compute unit.
    fn default() -> Capset {
        Capset {
            version_minor: VERSION_MINOR,
            features: Features::ALL,
            va_bits: DEFAULT_VA_BITS,
            page_shift: PAGE_SHIFT as u8,
            compute_units: 1,
            page_sizes: 1 << PAGE_SHIFT,
            aperture_start: DEFAULT_APERTURE_START,
            aperture_end: DEFAULT_APERTURE_END,
            reserved_start: DEFAULT_RESERVED_START,
            reserved_end: DEFAULT_RESERVED_END,
            kernels: ALL_KERNELS_MASK,
            max_queues: DEFAULT_MAX_QUEUES,
            max_queue_depth: DEFAULT_MAX_QUEUE_DEPTH,
            max_contexts: DEFAULT_MAX_CONTEXTS,
            max_pending_faults: DEFAULT_MAX_PENDING_FAULTS,
            max_bound_bytes: DEFAULT_MAX_BOUND_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_bind_ops: DEFAULT_MAX_BIND_OPS,
            fault_timeout_ms: DEFAULT_FAULT_TIMEOUT_MS,
            max_signal_slots: DEFAULT_MAX_SIGNAL_SLOTS,
            max_fault_ring_records: DEFAULT_MAX_FAULT_RING_RECORDS,
            user_queue_kinds: crate::uq::USER_QUEUE_KINDS_ALL,
            max_user_queues: DEFAULT_MAX_USER_QUEUES,
        }
    }
}

impl Capset {
    /// The 128-byte payload the device returns for `GET_CAPSET`.
    pub fn encode(&self) -> [u8; CAPSET_SIZE] {
        let mut b = [0u8; CAPSET_SIZE];
        put_u32(&mut b, 0, CAPSET_MAGIC);
        put_u16(&mut b, 4, VERSION_MAJOR);
        put_u16(&mut b, 6, self.version_minor);
        put_u32(&mut b, 8, CAPSET_SIZE as u32);
        put_u32(&mut b, 12, self.features.bits());
        put_u8(&mut b, 16, self.va_bits);
        put_u8(&mut b, 17, self.page_shift);
        put_u32(&mut b, 20, self.compute_units);
        put_u64(&mut b, 24, self.page_sizes);
        put_u64(&mut b, 32, self.aperture_start.raw());
        put_u64(&mut b, 40, self.aperture_end.raw());
        put_u64(&mut b, 48, self.reserved_start.raw());
        put_u64(&mut b, 56, self.reserved_end.raw());
        put_u64(&mut b, 64, self.kernels);
        put_u32(&mut b, 72, self.max_queues);
        put_u32(&mut b, 76, self.max_queue_depth);
        put_u32(&mut b, 80, self.max_contexts);
        put_u32(&mut b, 84, self.max_pending_faults);
        put_u64(&mut b, 88, self.max_bound_bytes);
        put_u32(&mut b, 96, self.max_request_bytes);
        put_u32(&mut b, 100, self.max_bind_ops);
        put_u32(&mut b, 104, self.fault_timeout_ms);
        put_u32(&mut b, 108, self.max_signal_slots);
        put_u32(&mut b, 112, self.max_fault_ring_records);
        put_u32(&mut b, 116, self.user_queue_kinds);
        put_u32(&mut b, 120, self.max_user_queues);
        b
    }

    /// Reads a capset payload: the magic, major version 1 and a `size` of
    /// at least 128 that `bytes` holds. Reserved fields and unknown feature
    /// bits are ignored (a newer minor version may use them).
    pub fn decode(bytes: &[u8]) -> Result<Capset, DecodeError> {
        if bytes.len() < CAPSET_SIZE {
            return Err(DecodeError::TooShort {
                needed: CAPSET_SIZE,
                actual: bytes.len(),
            });
        }
        let magic = u32_at(bytes, 0)?;
        if magic != CAPSET_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let major = u16_at(bytes, 4)?;
        if major != VERSION_MAJOR {
            return Err(DecodeError::UnsupportedVersion { major });
        }
        let size = u32_at(bytes, 8)?;
        if (size as usize) < CAPSET_SIZE {
            return Err(DecodeError::InvalidValue {
                field: "size",
                value: u64::from(size),
            });
        }
        if size as usize > bytes.len() {
            return Err(DecodeError::TooShort {
                needed: size as usize,
                actual: bytes.len(),
            });
        }
        Ok(Capset {
            version_minor: u16_at(bytes, 6)?,
            features: Features::from_bits_retain(u32_at(bytes, 12)?),
            va_bits: u8_at(bytes, 16)?,
            page_shift: u8_at(bytes, 17)?,
            compute_units: u32_at(bytes, 20)?,
            page_sizes: u64_at(bytes, 24)?,
            aperture_start: GpuVa(u64_at(bytes, 32)?),
            aperture_end: GpuVa(u64_at(bytes, 40)?),
            reserved_start: GpuVa(u64_at(bytes, 48)?),
            reserved_end: GpuVa(u64_at(bytes, 56)?),
            kernels: u64_at(bytes, 64)?,
            max_queues: u32_at(bytes, 72)?,
            max_queue_depth: u32_at(bytes, 76)?,
            max_contexts: u32_at(bytes, 80)?,
            max_pending_faults: u32_at(bytes, 84)?,
            max_bound_bytes: u64_at(bytes, 88)?,
            max_request_bytes: u32_at(bytes, 96)?,
            max_bind_ops: u32_at(bytes, 100)?,
            fault_timeout_ms: u32_at(bytes, 104)?,
            max_signal_slots: u32_at(bytes, 108)?,
            max_fault_ring_records: u32_at(bytes, 112)?,
            user_queue_kinds: u32_at(bytes, 116)?,
            max_user_queues: u32_at(bytes, 120)?,
        })
    }

    /// Whether the device runs user queues of `kind` (1.1: the feature bit
    /// and the kind's bit are both set).
    pub const fn supports_user_queue(&self, kind: crate::uq::UserQueueKind) -> bool {
        self.features.contains(Features::USER_QUEUES) && self.user_queue_kinds & kind.bit() != 0
    }

    /// Whether the device runs the kernel with this wire id.
    pub const fn supports_kernel(&self, kernel_id: u32) -> bool {
        kernel_id < 64 && self.kernels & (1 << kernel_id) != 0
    }
}
