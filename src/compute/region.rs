//! ComputeSession memory: a region of a guest resource the daemon reads and writes.
//!
//! The reply buffer, the fault ring and the signal area live in resources
//! the guest created; the daemon reaches them page by page through the
//! resource's backing, always through vm-memory, so a page that is not guest
//! RAM is an error and never a host access. The page list is resolved once,
//! when the session starts; the region is dropped before its resource's
//! backing can go away (see `docs/protocol.md` section 6).

use std::sync::atomic::Ordering;

use gpu_backend::GuestRam;
use guest_proto::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend as _};

use crate::context_backend::GuestBacking;

/// Why a region cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The region extends past the resource's backing.
    #[error("region {offset:#x}+{size:#x} is past the end of the backing ({backing:#x} bytes)")]
    OutOfRange {
        /// Region offset.
        offset: u64,
        /// Region size.
        size: u64,
        /// GuestBacking length.
        backing: u64,
    },
    /// A backing entry is not page-aligned.
    #[error("backing entry at {0:#x} is not page aligned")]
    Unaligned(u64),
    /// A page is not guest RAM.
    #[error("guest page {0:#x} is not guest RAM")]
    NotGuestRam(u64),
    /// An access does not fit in the region (or is misaligned for an
    /// atomic).
    #[error("access of {len} bytes at {off:#x} does not fit the region of {size:#x} bytes")]
    Outside {
        /// Offset in the region.
        off: u64,
        /// Bytes accessed.
        len: u64,
        /// Region size.
        size: u64,
    },
    /// Guest memory refused the access (the memory table changed).
    #[error("guest memory at {0:#x} refused the access")]
    Memory(u64),
}

/// The guest-physical pages of a resource's backing from byte `offset` on,
/// `count` pages. `offset` and every piece of the backing it covers must be
/// page-aligned.
pub fn backing_pages(
    backing: &GuestBacking,
    offset: u64,
    count: usize,
    out: &mut Vec<GuestAddress>,
) -> Result<(), RegionError> {
    let size = (count as u64).saturating_mul(PAGE_SIZE);
    if !offset.is_multiple_of(PAGE_SIZE) {
        return Err(RegionError::Unaligned(offset));
    }
    let pieces = backing
        .pieces(offset, size)
        .ok_or(RegionError::OutOfRange {
            offset,
            size,
            backing: backing.len(),
        })?;
    for (addr, len) in pieces {
        if addr.0 % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(RegionError::Unaligned(addr.0));
        }
        out.extend((0..len / PAGE_SIZE).map(|i| GuestAddress(addr.0 + i * PAGE_SIZE)));
    }
    Ok(())
}

/// A byte range of a resource, resolved to guest pages.
#[derive(Debug)]
pub struct GuestRegion {
    memory: GuestRam,
    /// Guest-physical address of every page the region touches.
    pages: Vec<GuestAddress>,
    /// Offset of the region's first byte in its first page.
    lead: u64,
    size: u64,
}

impl GuestRegion {
    /// Resolves `size` bytes at `offset` of a resource with `backing`.
    pub fn new(
        memory: GuestRam,
        backing: &GuestBacking,
        offset: u64,
        size: u64,
    ) -> Result<GuestRegion, RegionError> {
        let out_of_range = RegionError::OutOfRange {
            offset,
            size,
            backing: backing.len(),
        };
        let end = offset.checked_add(size).ok_or(out_of_range)?;
        if end > backing.len() {
            return Err(out_of_range);
        }
        let first = offset - offset % PAGE_SIZE;
        let count = usize::try_from(end.div_ceil(PAGE_SIZE) - first / PAGE_SIZE)
            .map_err(|_| out_of_range)?;
        let mut pages = Vec::with_capacity(count);
        backing_pages(backing, first, count, &mut pages)?;
        {
            let mem = memory.memory();
            if let Some(bad) = pages
                .iter()
                .find(|p| !mem.check_range(**p, PAGE_SIZE as usize))
            {
                return Err(RegionError::NotGuestRam(bad.0));
            }
        }
        Ok(GuestRegion {
            memory,
            pages,
            lead: offset % PAGE_SIZE,
            size,
        })
    }

    /// Length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether a byte of the region lies in guest-physical `[start, end)`.
    pub fn overlaps_gpa(&self, start: u64, end: u64) -> bool {
        let (first, last) = (self.lead, self.lead.saturating_add(self.size));
        self.pages.iter().enumerate().any(|(i, page)| {
            let base = (i as u64).saturating_mul(PAGE_SIZE);
            let from = first.max(base) - base;
            let to = last
                .min(base.saturating_add(PAGE_SIZE))
                .saturating_sub(base);
            from < to && page.0 + from < end && start < page.0 + to
        })
    }

    /// Whether `len` bytes at `off` lie inside the region.
    fn fits(&self, off: u64, len: usize) -> bool {
        off.checked_add(len as u64)
            .is_some_and(|end| end <= self.size)
    }

    /// The guest-physical address of byte `off`, if inside the region.
    fn addr(&self, off: u64) -> Option<GuestAddress> {
        if off >= self.size {
            return None;
        }
        let abs = self.lead + off;
        let page = self.pages.get(usize::try_from(abs / PAGE_SIZE).ok()?)?;
        Some(GuestAddress(page.0 + abs % PAGE_SIZE))
    }

    fn outside(&self, off: u64, len: usize) -> RegionError {
        RegionError::Outside {
            off,
            len: len as u64,
            size: self.size,
        }
    }

    /// Writes `bytes` at `off`.
    pub fn write(&self, off: u64, bytes: &[u8]) -> Result<(), RegionError> {
        if !self.fits(off, bytes.len()) {
            return Err(self.outside(off, bytes.len()));
        }
        let mem = self.memory.memory();
        let mut done = 0usize;
        while done < bytes.len() {
            let at = off.saturating_add(done as u64);
            let addr = self.addr(at).ok_or(self.outside(off, bytes.len()))?;
            let in_page = (PAGE_SIZE - (self.lead + at) % PAGE_SIZE) as usize;
            let n = in_page.min(bytes.len() - done);
            let chunk = bytes
                .get(done..done + n)
                .ok_or(self.outside(off, bytes.len()))?;
            mem.write_slice(chunk, addr)
                .map_err(|_| RegionError::Memory(addr.0))?;
            done += n;
        }
        Ok(())
    }

    /// Fills `buf` from `off`; false if it does not fit.
    #[cfg(test)]
    pub fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        if !self.fits(off, buf.len()) {
            return false;
        }
        let mem = self.memory.memory();
        let mut done = 0usize;
        while done < buf.len() {
            let at = off.saturating_add(done as u64);
            let Some(addr) = self.addr(at) else {
                return false;
            };
            let in_page = (PAGE_SIZE - (self.lead + at) % PAGE_SIZE) as usize;
            let n = in_page.min(buf.len() - done);
            let Some(chunk) = buf.get_mut(done..done + n) else {
                return false;
            };
            if mem.read_slice(chunk, addr).is_err() {
                return false;
            }
            done += n;
        }
        true
    }

    /// Stores a `u32` at a 4-aligned `off` with release ordering.
    pub fn store_u32_release(&self, off: u64, value: u32) -> Result<(), RegionError> {
        let addr = self.aligned(off, 4).ok_or(self.outside(off, 4))?;
        self.memory
            .memory()
            .store(value, addr, Ordering::Release)
            .map_err(|_| RegionError::Memory(addr.0))
    }

    /// Loads a `u32` at a 4-aligned `off` with acquire ordering.
    pub fn load_u32_acquire(&self, off: u64) -> Option<u32> {
        let addr = self.aligned(off, 4)?;
        self.memory.memory().load(addr, Ordering::Acquire).ok()
    }

    fn aligned(&self, off: u64, align: u64) -> Option<GuestAddress> {
        if !(self.lead + off).is_multiple_of(align) || off.checked_add(align)? > self.size {
            return None;
        }
        self.addr(off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    fn ram() -> GuestRam {
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        GuestMemoryAtomic::new(mmap)
    }

    fn backing(entries: &[(u64, u32)]) -> GuestBacking {
        GuestBacking {
            entries: entries
                .iter()
                .map(|(a, l)| (GuestAddress(*a), *l))
                .collect(),
        }
    }

    #[test]
    fn writes_split_across_scattered_pages() {
        let mem = ram();
        let b = backing(&[(0x5000, 0x1000), (0x2000, 0x2000)]);
        let region = GuestRegion::new(mem.clone(), &b, 0xFC0, 0x100).unwrap();
        let data: Vec<u8> = (0..0x80u8).collect();
        region.write(0, &data).unwrap();
        let m = mem.memory();
        let mut first = [0u8; 0x40];
        m.read_slice(&mut first, GuestAddress(0x5FC0)).unwrap();
        assert_eq!(&first[..], &data[..0x40]);
        let mut second = [0u8; 0x40];
        m.read_slice(&mut second, GuestAddress(0x2000)).unwrap();
        assert_eq!(&second[..], &data[0x40..]);
        let mut back = vec![0u8; 0x80];
        assert!(region.read(0, &mut back));
        assert_eq!(back, data);
        assert_eq!(
            region.write(0xF0, &[0u8; 0x20]),
            Err(RegionError::Outside {
                off: 0xF0,
                len: 0x20,
                size: 0x100
            }),
            "past the region end"
        );
        region.store_u32_release(0x40, 7).unwrap();
        assert!(region.store_u32_release(0x41, 7).is_err(), "misaligned");
        assert_eq!(region.load_u32_acquire(0x40), Some(7));
        assert_eq!(region.load_u32_acquire(0x41), None);
    }

    #[test]
    fn overlaps_count_only_the_bytes_of_the_region() {
        let mem = ram();
        let b = backing(&[(0x5000, 0x1000), (0x2000, 0x2000)]);
        // Bytes 0x5FC0..0x6000 and 0x2000..0x20C0.
        let region = GuestRegion::new(mem, &b, 0xFC0, 0x100).unwrap();
        assert!(region.overlaps_gpa(0x5FFF, 0x6000));
        assert!(
            !region.overlaps_gpa(0x5000, 0x5FC0),
            "the page, not the region"
        );
        assert!(region.overlaps_gpa(0x20BF, 0x3000));
        assert!(!region.overlaps_gpa(0x20C0, 0x4000));
        assert!(
            !region.overlaps_gpa(0x3000, 0x4000),
            "a page the region does not reach"
        );
        assert!(region.overlaps_gpa(0, u64::MAX));
    }

    #[test]
    fn rejects_ranges_past_the_backing_and_unaligned_entries() {
        let mem = ram();
        let b = backing(&[(0x5000, 0x1000)]);
        assert!(matches!(
            GuestRegion::new(mem.clone(), &b, 0xFC0, 0x80),
            Err(RegionError::OutOfRange { .. })
        ));
        assert!(GuestRegion::new(mem.clone(), &b, u64::MAX - 8, 0x80).is_err());
        let odd = backing(&[(0x5800, 0x1000)]);
        assert_eq!(
            GuestRegion::new(mem.clone(), &odd, 0, 0x40).unwrap_err(),
            RegionError::Unaligned(0x5800)
        );
        let outside = backing(&[(0x20_0000, 0x1000)]);
        assert_eq!(
            GuestRegion::new(mem, &outside, 0, 0x40).unwrap_err(),
            RegionError::NotGuestRam(0x20_0000)
        );
    }
}
