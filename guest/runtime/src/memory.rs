//! Process memory the GPU may use: pinning pages and finding their
//! guest-physical addresses.
//!
//! This is what a user-space resolver on an unmodified guest kernel can do:
//! fault the pages in (`MADV_POPULATE_WRITE`), lock them (`mlock`), and read
//! their frames from `/proc/self/pagemap` (which shows frames only to
//! `CAP_SYS_ADMIN`). A guest kernel driver would use `pin_user_pages` or HMM
//! instead; see docs/guest-runtime.md.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use guest_proto::{GuestPhysAddr, PAGE_SIZE};

/// `MADV_POPULATE_READ` and `MADV_POPULATE_WRITE` (Linux 5.14).
const MADV_POPULATE_READ: i32 = 22;
const MADV_POPULATE_WRITE: i32 = 23;
/// Bits of a pagemap entry.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_PFN_MASK: u64 = (1 << 55) - 1;

/// Decodes one `/proc/<pid>/pagemap` entry: the frame, if the page is
/// present and the frame is visible.
pub fn pagemap_frame(entry: u64) -> Option<GuestPhysAddr> {
    let pfn = entry & PAGEMAP_PFN_MASK;
    (entry & PAGEMAP_PRESENT != 0 && pfn != 0).then(|| GuestPhysAddr(pfn * PAGE_SIZE))
}

/// Makes `[addr, addr + len)` (page-aligned) resident and writable-mapped,
/// and locks it in memory.
pub fn pin(addr: u64, len: u64) -> io::Result<()> {
    pin_range(addr, len, true)
}

/// Makes `[addr, addr + len)` (page-aligned) resident and locks it;
/// `writable`: fault the pages in for writing (the mapping must be
/// writable), else for reading only (a read-only mapping).
pub fn pin_range(addr: u64, len: u64, writable: bool) -> io::Result<()> {
    let (ptr, n) = (addr as *mut libc::c_void, len as usize);
    let advice = if writable {
        MADV_POPULATE_WRITE
    } else {
        MADV_POPULATE_READ
    };
    // SAFETY: madvise/mlock only change page state of the caller's own
    // mapping; an invalid range is reported as an error.
    let populated = unsafe { libc::madvise(ptr, n, advice) } == 0;
    if !populated {
        if !writable {
            return Err(io::Error::last_os_error());
        }
        touch(addr, len);
    }
    // SAFETY: as above.
    if unsafe { libc::mlock(ptr, n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unlocks `[addr, addr + len)` (what [`pin`] locked); errors (a range
/// no longer mapped) are ignored: there is nothing left to unlock then.
pub fn unpin(addr: u64, len: u64) {
    // SAFETY: munlock only changes page state of the caller's own mapping.
    let _ = unsafe { libc::munlock(addr as *const libc::c_void, len as usize) };
}

/// Faults pages in by reading and writing back one byte of each (for
/// kernels without `MADV_POPULATE_WRITE`). The range must be mapped
/// writable by the caller.
fn touch(addr: u64, len: u64) {
    let mut at = addr;
    while at < addr + len {
        let p = at as *mut u8;
        // SAFETY: the caller owns this writable mapping; a volatile
        // read-modify-write of the same value changes no data.
        unsafe { p.write_volatile(p.read_volatile()) };
        at += PAGE_SIZE;
    }
}

/// Reads the guest-physical address of every page of `[addr, addr + len)`.
pub fn frames(addr: u64, len: u64) -> io::Result<Vec<GuestPhysAddr>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let count = (len / PAGE_SIZE) as usize;
    let mut raw = vec![0u8; count * 8];
    pagemap.read_exact_at(&mut raw, (addr / PAGE_SIZE) * 8)?;
    raw.chunks_exact(8)
        .enumerate()
        .map(|(i, b)| {
            let mut e = [0u8; 8];
            e.copy_from_slice(b);
            pagemap_frame(u64::from_le_bytes(e)).ok_or_else(|| {
                io::Error::other(format!(
                    "page {:#x} has no visible frame (not resident, or no CAP_SYS_ADMIN)",
                    addr + i as u64 * PAGE_SIZE
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entries_decode() {
        assert_eq!(
            pagemap_frame(PAGEMAP_PRESENT | 0x1234),
            Some(GuestPhysAddr(0x123_4000))
        );
        assert_eq!(pagemap_frame(0x1234), None, "not present");
        assert_eq!(pagemap_frame(PAGEMAP_PRESENT), None, "frame hidden");
        assert_eq!(
            pagemap_frame(PAGEMAP_PRESENT | (1 << 55) | 7),
            Some(GuestPhysAddr(7 * PAGE_SIZE)),
            "soft-dirty and flag bits are not part of the frame"
        );
    }

    #[test]
    fn pinning_and_reading_our_own_pagemap() {
        let b = crate::mmap::Mmap::anonymous(3 * PAGE_SIZE as usize).unwrap();
        pin(b.addr(), b.len() as u64).unwrap();
        b.set_u32(5, 9).unwrap();
        assert_eq!(b.get_u32(5), Some(9));
        assert_eq!(b.get_u32(3 * 1024), None);
        // Frames are visible only with CAP_SYS_ADMIN; the read must work
        // either way and give one entry per page when visible.
        if let Ok(f) = frames(b.addr(), b.len() as u64) {
            assert_eq!(f.len(), 3);
            assert!(f.iter().all(|p| p.is_page_aligned()));
        }
    }
}
