//! `RANGE_ATTR`: attributes of a GPU VA range, set the way `madvise` sets
//! them on CPU memory.
//!
//! Attributes are policy the device applies to faults in the range (may
//! the GPU be granted this access, is a fault forwarded or fatal, how big
//! is a fault granule) plus the one-shot prefault request. They are
//! independent of mappings. A request carries at most one value per
//! attribute type, so the decoded form is a struct of optional values
//! rather than a list: the device applies it atomically, order does not
//! matter, and a type given twice is refused (`docs/protocol.md` 5.6).

use crate::error::DecodeError;
use crate::types::{FaultPolicy, GpuVa, PAGE_SIZE, Perms};
use crate::wire::{put_u32, put_u64, reserved_at, u32_at, u64_at};

/// Length of the fixed part of a `RANGE_ATTR` request.
pub const RANGE_ATTR_FIXED_LEN: usize = 40;
/// Size of one attribute on the wire.
pub const ATTR_SIZE: usize = 16;
/// Most attributes in one request.
pub const MAX_RANGE_ATTRS: u32 = 8;
/// Smallest fault granule: one page.
pub const MIN_GRANULE_SHIFT: u8 = 12;
/// Largest fault granule: 1 GiB.
pub const MAX_GRANULE_SHIFT: u8 = 30;

/// Wire values of an attribute's `type`.
pub mod attr_type {
    /// [`super::RangeAttrs::access`]
    pub const ACCESS: u32 = 1;
    /// [`super::RangeAttrs::fault_policy`]
    pub const FAULT_POLICY: u32 = 2;
    /// [`super::RangeAttrs::granule_shift`]
    pub const GRANULARITY: u32 = 3;
    /// [`super::RangeAttrs::prefault`]
    pub const PREFAULT: u32 = 4;
}

impl FaultPolicy {
    /// The `FAULT_POLICY` attribute value.
    pub const fn to_wire(self) -> u64 {
        match self {
            FaultPolicy::Recoverable => 0,
            FaultPolicy::Fatal => 1,
        }
    }

    /// Parses a `FAULT_POLICY` attribute value.
    pub const fn from_wire(value: u64) -> Option<FaultPolicy> {
        match value {
            0 => Some(FaultPolicy::Recoverable),
            1 => Some(FaultPolicy::Fatal),
            _ => None,
        }
    }
}

/// The attributes one request sets; `None` leaves an attribute as it is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct RangeAttrs {
    /// `ACCESS`: the permissions the GPU may be granted in the range.
    pub access: Option<Perms>,
    /// `FAULT_POLICY`: forward faults or fail the work at once.
    pub fault_policy: Option<FaultPolicy>,
    /// `GRANULARITY`: log2 of the fault granule, 12 ..= 30.
    pub granule_shift: Option<u8>,
    /// `PREFAULT`: `true` posts prefault records for the unbound granules.
    pub prefault: Option<bool>,
}

impl RangeAttrs {
    /// Number of attributes set (the request's `attr_count`).
    pub fn count(&self) -> u32 {
        u32::from(self.access.is_some())
            + u32::from(self.fault_policy.is_some())
            + u32::from(self.granule_shift.is_some())
            + u32::from(self.prefault.is_some())
    }

    /// The attributes as wire `(type, value)` pairs, in type order.
    fn wire_pairs(&self) -> impl Iterator<Item = (u32, u64)> {
        [
            self.access
                .map(|p| (attr_type::ACCESS, u64::from(p.bits()))),
            self.fault_policy
                .map(|p| (attr_type::FAULT_POLICY, p.to_wire())),
            self.granule_shift
                .map(|s| (attr_type::GRANULARITY, u64::from(s))),
            self.prefault.map(|p| (attr_type::PREFAULT, u64::from(p))),
        ]
        .into_iter()
        .flatten()
    }

    /// Records one wire attribute, refusing a value outside its domain or a
    /// type already set.
    fn set(&mut self, attr_type: u32, value: u64) -> Result<(), DecodeError> {
        let invalid = DecodeError::InvalidValue {
            field: "attr.value",
            value,
        };
        let duplicate = DecodeError::DuplicateAttribute { attr_type };
        match attr_type {
            attr_type::ACCESS => {
                let bits = u32::try_from(value).map_err(|_| invalid)?;
                let perms = Perms::from_bits(bits).ok_or(invalid)?;
                replace_once(&mut self.access, perms, duplicate)
            }
            attr_type::FAULT_POLICY => {
                let policy = FaultPolicy::from_wire(value).ok_or(invalid)?;
                replace_once(&mut self.fault_policy, policy, duplicate)
            }
            attr_type::GRANULARITY => {
                let shift = u8::try_from(value)
                    .ok()
                    .filter(|s| (MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT).contains(s))
                    .ok_or(invalid)?;
                replace_once(&mut self.granule_shift, shift, duplicate)
            }
            attr_type::PREFAULT => {
                let prefault = match value {
                    0 => false,
                    1 => true,
                    _ => return Err(invalid),
                };
                replace_once(&mut self.prefault, prefault, duplicate)
            }
            _ => Err(DecodeError::InvalidValue {
                field: "attr.type",
                value: u64::from(attr_type),
            }),
        }
    }
}

fn replace_once<T>(
    slot: &mut Option<T>,
    value: T,
    duplicate: DecodeError,
) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(duplicate);
    }
    *slot = Some(value);
    Ok(())
}

/// A `RANGE_ATTR` request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RangeAttr {
    /// Page-aligned start of the range.
    pub va: GpuVa,
    /// Page-aligned length, > 0.
    pub size: u64,
    /// What to set; at least one attribute.
    pub attrs: RangeAttrs,
}

impl RangeAttr {
    /// Decodes the request `bytes` (header included, `len` already framed).
    pub(crate) fn decode(bytes: &[u8]) -> Result<RangeAttr, DecodeError> {
        if bytes.len() < RANGE_ATTR_FIXED_LEN {
            return Err(DecodeError::TooShort {
                needed: RANGE_ATTR_FIXED_LEN,
                actual: bytes.len(),
            });
        }
        let va = GpuVa(u64_at(bytes, 16)?);
        let size = u64_at(bytes, 24)?;
        let count = u32_at(bytes, 32)?;
        if count == 0 {
            return Err(DecodeError::Zero {
                field: "attr_count",
            });
        }
        if count > MAX_RANGE_ATTRS {
            return Err(DecodeError::CountTooLarge {
                field: "attr_count",
                count: u64::from(count),
                max: u64::from(MAX_RANGE_ATTRS),
            });
        }
        let expected_len = RANGE_ATTR_FIXED_LEN as u64 + u64::from(count) * ATTR_SIZE as u64;
        if expected_len != bytes.len() as u64 {
            return Err(DecodeError::CountMismatch {
                field: "attr_count",
                count,
                expected_len,
                len: bytes.len(),
            });
        }
        reserved_at(bytes, 36, 4, "reserved")?;
        check_range(va, size)?;

        let mut attrs = RangeAttrs::default();
        let list = bytes.get(RANGE_ATTR_FIXED_LEN..).unwrap_or_default();
        for attr in list.chunks_exact(ATTR_SIZE) {
            reserved_at(attr, 4, 4, "attr.reserved")?;
            attrs.set(u32_at(attr, 0)?, u64_at(attr, 8)?)?;
        }
        Ok(RangeAttr { va, size, attrs })
    }

    /// Length of the encoded request, header included.
    pub(crate) fn encoded_len(&self) -> usize {
        RANGE_ATTR_FIXED_LEN + self.attrs.count() as usize * ATTR_SIZE
    }

    /// Writes the request body into `buf` (the whole request).
    pub(crate) fn write(&self, buf: &mut [u8]) {
        put_u64(buf, 16, self.va.raw());
        put_u64(buf, 24, self.size);
        put_u32(buf, 32, self.attrs.count());
        for (i, (attr_type, value)) in self.attrs.wire_pairs().enumerate() {
            let at = RANGE_ATTR_FIXED_LEN + i * ATTR_SIZE;
            put_u32(buf, at, attr_type);
            put_u64(buf, at + 8, value);
        }
    }
}

/// `va` and `size` page-aligned, `size > 0`, no wrap around 2^64.
fn check_range(va: GpuVa, size: u64) -> Result<(), DecodeError> {
    if !va.is_page_aligned() {
        return Err(DecodeError::Misaligned {
            field: "va",
            value: va.raw(),
        });
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(DecodeError::Misaligned {
            field: "size",
            value: size,
        });
    }
    if size == 0 {
        return Err(DecodeError::Zero { field: "size" });
    }
    va.checked_add(size)
        .map(|_| ())
        .ok_or(DecodeError::Overflow { field: "va+size" })
}
