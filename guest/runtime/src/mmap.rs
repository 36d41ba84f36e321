//! One owned memory mapping: a device buffer shared with the GPU, or plain
//! anonymous memory the application owns.
//!
//! The device (or the GPU through the host) writes such memory at any time,
//! so no Rust reference to its bytes is ever handed out: every access is a
//! bounds-checked volatile copy or an atomic load/store with explicit
//! ordering, as the protocol's publication rules require (payload first,
//! then an index or `seqno` with release ordering).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use guest_proto::PAGE_SIZE;

/// An owned mapping of `len` bytes, unmapped on drop.
#[derive(Debug)]
pub struct Mmap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access goes
// through volatile or atomic operations, so moving it to another thread is
// no different from keeping it.
unsafe impl Send for Mmap {}
// SAFETY: as above: shared access is only volatile reads and atomics, and
// the writes through `&self` (`write`, `store_*`) are to memory the device
// may change concurrently anyway.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// `len` bytes (rounded up to whole pages) of fresh private anonymous
    /// memory, not yet resident: what `malloc` gives an application,
    /// page-aligned so that GPU pages and CPU pages coincide.
    pub fn anonymous(len: usize) -> io::Result<Mmap> {
        let len = len.next_multiple_of(PAGE_SIZE as usize);
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        Self::map(len, flags, -1, 0)
    }

    /// `len` bytes (rounded up to whole pages) of address space only:
    /// `PROT_NONE`, never backed, never resident (a GPU scratch aperture,
    /// say). Any access through [`Mmap::read`] and friends faults, so
    /// only use its address.
    pub fn reserve(len: usize) -> io::Result<Mmap> {
        let len = len.next_multiple_of(PAGE_SIZE as usize);
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        Self::map_prot(len, libc::PROT_NONE, flags, -1, 0)
    }

    /// A shared mapping of `len` bytes of `fd` at `offset` (a DRM buffer
    /// object's fake offset, for instance).
    pub fn shared(fd: RawFd, offset: u64, len: usize) -> io::Result<Mmap> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        Self::map(len, libc::MAP_SHARED, fd, offset)
    }

    fn map(len: usize, flags: libc::c_int, fd: RawFd, offset: libc::off_t) -> io::Result<Mmap> {
        Self::map_prot(len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, offset)
    }

    fn map_prot(
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
        fd: RawFd,
        offset: libc::off_t,
    ) -> io::Result<Mmap> {
        if len == 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: a new mapping chosen by the kernel (no fixed address), so
        // no existing memory is affected; the kernel validates fd, offset
        // and length, and failure is checked below.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Start address: the CPU virtual address, and so the identity GPU VA.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty (never, for a live mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pointer to byte `off` if `[off, off + n)` lies in the mapping.
    fn at(&self, off: usize, n: usize) -> Option<*mut u8> {
        let end = off.checked_add(n)?;
        // SAFETY: `off <= end <= len`, so the result stays inside the
        // mapping (or one past its end when `n == 0`).
        (end <= self.len).then(|| unsafe { self.ptr.add(off) })
    }

    /// Copies `buf.len()` bytes from `off`; `None` if out of bounds.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> Option<()> {
        let src = self.at(off, buf.len())?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `src + i` is inside the mapping (checked by `at`);
            // a volatile read because the device may write it.
            *b = unsafe { src.add(i).read_volatile() };
        }
        Some(())
    }

    /// Copies `bytes` to `off`; `None` if out of bounds.
    pub fn write(&self, off: usize, bytes: &[u8]) -> Option<()> {
        let dst = self.at(off, bytes.len())?;
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: `dst + i` is inside the mapping (checked by `at`).
            unsafe { dst.add(i).write_volatile(*b) };
        }
        Some(())
    }

    /// Fills `[off, off + len)` with zeroes.
    pub fn zero(&self, off: usize, len: usize) -> Option<()> {
        let dst = self.at(off, len)?;
        for i in 0..len {
            // SAFETY: `dst + i` is inside the mapping (checked by `at`).
            unsafe { dst.add(i).write_volatile(0) };
        }
        Some(())
    }

    fn atomic<T>(&self, off: usize) -> Option<*mut T> {
        let p = self.at(off, size_of::<T>())?;
        p.cast::<T>().is_aligned().then(|| p.cast())
    }

    /// Acquire-load of the `u32` at `off` (4-aligned).
    pub fn load_u32(&self, off: usize) -> Option<u32> {
        let p = self.atomic::<AtomicU32>(off)?;
        // SAFETY: aligned and in bounds; the memory lives as long as
        // `self`, and atomics on shared memory are how it is accessed.
        Some(unsafe { &*p }.load(Ordering::Acquire))
    }

    /// Release-store of the `u32` at `off` (4-aligned).
    pub fn store_u32(&self, off: usize, v: u32) -> Option<()> {
        let p = self.atomic::<AtomicU32>(off)?;
        // SAFETY: as in `load_u32`.
        unsafe { &*p }.store(v, Ordering::Release);
        Some(())
    }

    /// Acquire-load of the `u64` at `off` (8-aligned).
    pub fn load_u64(&self, off: usize) -> Option<u64> {
        let p = self.atomic::<AtomicU64>(off)?;
        // SAFETY: as in `load_u32`.
        Some(unsafe { &*p }.load(Ordering::Acquire))
    }

    /// Release-store of the `u64` at `off` (8-aligned).
    pub fn store_u64(&self, off: usize, v: u64) -> Option<()> {
        let p = self.atomic::<AtomicU64>(off)?;
        // SAFETY: as in `load_u32`.
        unsafe { &*p }.store(v, Ordering::Release);
        Some(())
    }

    /// `u32` element `i` (little-endian, as the GPU writes it).
    pub fn get_u32(&self, i: usize) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(i.checked_mul(4)?, &mut b)?;
        Some(u32::from_le_bytes(b))
    }

    /// Sets `u32` element `i`.
    pub fn set_u32(&self, i: usize, v: u32) -> Option<()> {
        self.write(i.checked_mul(4)?, &v.to_le_bytes())
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value owns; nothing
        // refers to it after drop.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_checked_and_aligned() {
        let m = Mmap::anonymous(100).unwrap();
        assert_eq!(m.len(), 4096, "rounded to a page");
        assert!(m.addr().is_multiple_of(4096));
        m.write(4090, &[1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(m.write(4091, &[0; 6]), None, "past the end");
        let mut b = [0u8; 6];
        m.read(4090, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6]);
        assert_eq!(m.read(usize::MAX, &mut b), None, "wrapping offset");
        m.store_u32(8, 0xABCD).unwrap();
        assert_eq!(m.load_u32(8), Some(0xABCD));
        assert_eq!(m.get_u32(2), Some(0xABCD));
        assert_eq!(m.load_u32(9), None, "misaligned");
        m.store_u64(16, u64::MAX).unwrap();
        assert_eq!(m.load_u64(16), Some(u64::MAX));
        m.zero(16, 8).unwrap();
        assert_eq!(m.load_u64(16), Some(0));
        assert_eq!(m.get_u32(1024), None);
        assert!(Mmap::anonymous(0).is_err(), "nothing to map");
        let r = Mmap::reserve(1 << 30).unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| l.starts_with(&format!("{:x}-", r.addr())))
            .expect("reservation listed");
        assert!(line.contains(" ---p "), "PROT_NONE: {line}");
    }
}
