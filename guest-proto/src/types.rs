//! Domain newtypes shared by the guest, the daemon and the GPU backend.
//!
//! Addresses in different spaces are different types: a GPU virtual address
//! can never be passed where a guest-physical address is expected. All
//! arithmetic on them is checked, because every value may come from a guest.

use core::fmt;

/// log2 of the GPU page size. The device maps guest memory in 4 KiB pages.
pub const PAGE_SHIFT: u32 = 12;
/// The GPU page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// A virtual address in one context's GPU address space.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GpuVa(pub u64);

impl GpuVa {
    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + len`, or `None` if it would wrap around the 64-bit space.
    pub const fn checked_add(self, len: u64) -> Option<GpuVa> {
        match self.0.checked_add(len) {
            Some(v) => Some(GpuVa(v)),
            None => None,
        }
    }

    /// Whether the address is a multiple of [`PAGE_SIZE`].
    pub const fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }

    /// The start of the page holding this address.
    pub const fn page_down(self) -> GpuVa {
        GpuVa(self.0 & !(PAGE_SIZE - 1))
    }

    /// The offset of this address inside its page.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }
}

impl fmt::Debug for GpuVa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuVa({:#x})", self.0)
    }
}

impl fmt::Display for GpuVa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A guest-physical address: what the guest kernel calls a physical address
/// and what the device backend finds in the vhost-user memory table.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestPhysAddr(pub u64);

impl GuestPhysAddr {
    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + len`, or `None` if it would wrap around the 64-bit space.
    pub const fn checked_add(self, len: u64) -> Option<GuestPhysAddr> {
        match self.0.checked_add(len) {
            Some(v) => Some(GuestPhysAddr(v)),
            None => None,
        }
    }

    /// Whether the address is a multiple of [`PAGE_SIZE`].
    pub const fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }
}

impl fmt::Debug for GuestPhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuestPhysAddr({:#x})", self.0)
    }
}

impl fmt::Display for GuestPhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A virtio-gpu resource id, as the guest kernel allocated it. Id 0 is never
/// a valid resource.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ResourceId(pub u32);

/// A compute queue of one context, as the device numbered it on creation.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct QueueId(pub u32);

/// A recoverable fault, numbered by the device. Ids are never reused within
/// one session, so a late reply to an ended fault can always be recognised.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct FaultId(pub u64);

/// The index of a completion signal slot in a session's signal area.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SignalIndex(pub u32);

/// Page permissions of a GPU mapping.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perms(u32);

impl Perms {
    /// No access.
    pub const NONE: Perms = Perms(0);
    /// The GPU may read.
    pub const READ: Perms = Perms(1);
    /// The GPU may write (and, with `READ`, perform atomics).
    pub const WRITE: Perms = Perms(2);
    /// The GPU may fetch instructions.
    pub const EXEC: Perms = Perms(4);
    /// Read and write.
    pub const RW: Perms = Perms(3);
    /// Every permission bit this protocol version defines.
    pub const ALL: Perms = Perms(7);

    /// Parses wire bits; `None` if an undefined bit is set.
    pub const fn from_bits(bits: u32) -> Option<Perms> {
        if bits & !Self::ALL.0 == 0 {
            Some(Perms(bits))
        } else {
            None
        }
    }

    /// The wire bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every permission in `other` is also in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two permission sets.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// Whether no permission is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = if self.contains(Perms::READ) { 'r' } else { '-' };
        let w = if self.contains(Perms::WRITE) {
            'w'
        } else {
            '-'
        };
        let x = if self.contains(Perms::EXEC) { 'x' } else { '-' };
        write!(f, "Perms({r}{w}{x})")
    }
}

/// The kind of access that caused a GPU page fault. Faults merged on one
/// page carry the union of their access kinds, so the most intrusive access
/// is never lost.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AccessFlags(u8);

impl AccessFlags {
    /// A load.
    pub const READ: AccessFlags = AccessFlags(1);
    /// A store.
    pub const WRITE: AccessFlags = AccessFlags(2);
    /// An instruction fetch.
    pub const EXEC: AccessFlags = AccessFlags(4);
    /// An atomic read-modify-write.
    pub const ATOMIC: AccessFlags = AccessFlags(8);
    /// Every access bit this protocol version defines.
    pub const ALL: AccessFlags = AccessFlags(15);

    /// Parses wire bits; `None` if an undefined bit is set or none is.
    pub const fn from_bits(bits: u8) -> Option<AccessFlags> {
        if bits != 0 && bits & !Self::ALL.0 == 0 {
            Some(AccessFlags(bits))
        } else {
            None
        }
    }

    /// The wire bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The union of two access sets.
    pub const fn union(self, other: AccessFlags) -> AccessFlags {
        AccessFlags(self.0 | other.0)
    }

    /// Whether every access in `other` is also in `self`.
    pub const fn contains(self, other: AccessFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The page permissions these accesses need.
    pub const fn required_perms(self) -> Perms {
        let mut p = 0;
        if self.0 & (Self::READ.0 | Self::ATOMIC.0) != 0 {
            p |= Perms::READ.0;
        }
        if self.0 & (Self::WRITE.0 | Self::ATOMIC.0) != 0 {
            p |= Perms::WRITE.0;
        }
        if self.0 & Self::EXEC.0 != 0 {
            p |= Perms::EXEC.0;
        }
        Perms(p)
    }
}

impl fmt::Debug for AccessFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::READ, "read"),
            (Self::WRITE, "write"),
            (Self::EXEC, "exec"),
            (Self::ATOMIC, "atomic"),
        ];
        f.write_str("AccessFlags(")?;
        let mut first = true;
        for (flag, name) in names {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        f.write_str(")")
    }
}

/// What the device does when GPU work touches a page that is not bound (or
/// not bound with enough permission) inside a range.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum FaultPolicy {
    /// Stall the work, forward the fault to the guest, replay once it is
    /// resolved. The default.
    #[default]
    Recoverable,
    /// Fail the work at once; the fault is never forwarded.
    Fatal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn va_arithmetic_is_checked() {
        assert_eq!(GpuVa(u64::MAX - 1).checked_add(2), None);
        assert_eq!(GpuVa(0x1000).checked_add(0x1000), Some(GpuVa(0x2000)));
        assert_eq!(GpuVa(0x1234).page_down(), GpuVa(0x1000));
        assert_eq!(GpuVa(0x1234).page_offset(), 0x234);
        assert!(!GpuVa(0x1234).is_page_aligned());
    }

    #[test]
    fn perms_reject_undefined_bits() {
        assert_eq!(Perms::from_bits(8), None);
        assert_eq!(Perms::from_bits(3), Some(Perms::RW));
        assert!(Perms::RW.contains(Perms::READ));
        assert!(!Perms::READ.contains(Perms::WRITE));
    }

    #[test]
    fn access_flags_need_the_right_perms() {
        assert_eq!(AccessFlags::ATOMIC.required_perms(), Perms::RW);
        assert_eq!(AccessFlags::EXEC.required_perms(), Perms::EXEC);
        assert_eq!(AccessFlags::from_bits(0), None);
        assert_eq!(AccessFlags::from_bits(16), None);
        let merged = AccessFlags::READ.union(AccessFlags::WRITE);
        assert!(merged.contains(AccessFlags::WRITE));
        assert_eq!(merged.required_perms(), Perms::RW);
    }
}
