//! virtio-gpu resources and their guest backing.
//!
//! A resource is an id the guest chose, a kind, a size, and (once attached)
//! a list of guest-physical ranges. Every range is checked against guest
//! RAM when it is attached, the entry count is bounded, adjacent entries
//! are merged, and lengths are summed without overflow; reads go through
//! vm-memory.

use std::collections::BTreeSet;
use std::sync::Arc;

use gpu_backend::GuestRam;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
};

use super::protocol::MemEntries;
use crate::context_backend::{CtxId, GuestBacking, ResourceId, ResourceKind, ResourceView};

/// Why backing entries were refused, or a backing could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BackingError {
    /// No entries, or more than allowed.
    #[error("{count} entries (1 to {max} allowed)")]
    Count {
        /// Entries sent.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// An entry is not inside guest RAM (or has length 0).
    #[error("entry {addr:#x}+{len:#x} is not guest RAM")]
    NotGuestRam {
        /// Start.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Bytes outside the backing, or guest memory that cannot be read
    /// (the memory table changed).
    #[error("cannot read {len:#x} bytes at offset {offset:#x}")]
    Read {
        /// Offset in the resource.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

/// Host bytes one stored backing entry takes.
pub const ENTRY_BYTES: u64 = std::mem::size_of::<(GuestAddress, u32)>() as u64;

/// Host bytes a backing's entry list takes (what the per-guest budget
/// counts).
pub fn backing_cost(backing: &GuestBacking) -> u64 {
    (backing.entries.capacity() as u64).saturating_mul(ENTRY_BYTES)
}

/// Checks memory entries and makes them a backing. An entry that continues
/// the previous one in guest memory is merged into it, so a backing costs
/// host memory for its discontiguous pieces only; duplicates stay separate
/// (and are paid for).
pub fn backing_from(
    entries: MemEntries<'_>,
    max: u32,
    mem: &GuestRam,
) -> Result<GuestBacking, BackingError> {
    let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
    if count == 0 || count > max {
        return Err(BackingError::Count { count, max });
    }
    let guard = mem.memory();
    let mut out: Vec<(GuestAddress, u32)> = Vec::with_capacity(entries.len());
    // The region the last entry was in: a guest's entries are nearly always
    // in one, and a bounds check against it costs less than a lookup.
    let mut last_region: Option<(u64, u64)> = None;
    for e in entries.iter() {
        let (addr, len) = (e.addr.to_native(), e.length.to_native());
        if len == 0 {
            return Err(BackingError::NotGuestRam { addr, len });
        }
        let end = addr.checked_add(u64::from(len));
        let known = last_region
            .zip(end)
            .is_some_and(|((lo, hi), end)| addr >= lo && end <= hi);
        if !known {
            if !guard.check_range(GuestAddress(addr), len as usize) {
                return Err(BackingError::NotGuestRam { addr, len });
            }
            last_region = guard.find_region(GuestAddress(addr)).map(|r| {
                let lo = r.start_addr().raw_value();
                (lo, lo.saturating_add(r.len()))
            });
        }
        if let Some((last, last_len)) = out.last_mut() {
            let continues = last.0.checked_add(u64::from(*last_len)) == Some(addr);
            if let (true, Some(merged)) = (continues, last_len.checked_add(len)) {
                *last_len = merged;
                continue;
            }
        }
        out.push((GuestAddress(addr), len));
    }
    out.shrink_to_fit();
    Ok(GuestBacking { entries: out })
}

/// Copies `buf.len()` bytes from byte `offset` of the backing.
pub fn read_backing(
    mem: &GuestRam,
    backing: &GuestBacking,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), BackingError> {
    let err = BackingError::Read {
        offset,
        len: buf.len() as u64,
    };
    let pieces = backing.pieces(offset, buf.len() as u64).ok_or(err)?;
    let guard = mem.memory();
    let mut done = 0usize;
    for (addr, n) in pieces {
        let n = usize::try_from(n).map_err(|_| err)?;
        let chunk = buf.get_mut(done..done + n).ok_or(err)?;
        guard.read_slice(chunk, addr).map_err(|_| err)?;
        done += n;
    }
    Ok(())
}

/// One resource.
#[derive(Debug)]
pub struct Resource {
    /// The id.
    pub id: ResourceId,
    /// What it is.
    pub kind: ResourceKind,
    /// Image size (2D), 0 for buffers.
    pub width: u32,
    /// Image height (2D), 0 for buffers.
    pub height: u32,
    /// Size in bytes (buffers, blobs; 4 * width * height for images).
    pub size: u64,
    /// Bytes from one row of pixels to the next (images; blobs once shown
    /// with `SET_SCANOUT_BLOB`).
    pub stride: u64,
    /// Byte of the first pixel.
    pub offset: u64,
    /// The guest backing.
    pub backing: Option<Arc<GuestBacking>>,
    /// Host copy of a 2D image (filled by TRANSFER_TO_HOST_2D).
    pub image: Option<Vec<u8>>,
    /// Contexts it is attached to.
    pub contexts: BTreeSet<CtxId>,
}

impl Resource {
    /// A new resource without backing.
    pub fn new(id: ResourceId, kind: ResourceKind, width: u32, height: u32, size: u64) -> Resource {
        Resource {
            id,
            kind,
            width,
            height,
            size,
            stride: u64::from(width) * 4,
            offset: 0,
            backing: None,
            image: None,
            contexts: BTreeSet::new(),
        }
    }

    /// The view the compute layer gets.
    pub fn view(&self) -> ResourceView {
        ResourceView {
            id: self.id,
            kind: self.kind,
            size: self.size,
            backing: self.backing.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    fn ram() -> GuestRam {
        GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        )
    }

    fn parse(list: &[(u64, u32)], max: u32, mem: &GuestRam) -> Result<GuestBacking, BackingError> {
        let mut b = Vec::new();
        for (a, l) in list {
            b.extend_from_slice(&a.to_le_bytes());
            b.extend_from_slice(&l.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        backing_from(MemEntries::take(&b, list.len() as u32).unwrap(), max, mem)
    }

    /// Entries after one that was checked still are: in the same region
    /// (by its bounds), running past its end into a hole, in another
    /// region, or empty.
    #[test]
    fn every_entry_is_checked_even_after_one_in_the_same_region() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), 0x10000),
                (GuestAddress(0x20000), 0x10000),
            ])
            .unwrap(),
        );
        let b = parse(
            &[(0x1000, 0x1000), (0x3000, 0x1000), (0x20000, 0x1000)],
            16,
            &mem,
        );
        assert_eq!(b.map(|b| b.len()), Ok(0x3000));
        for bad in [
            (0xF000, 0x2000),
            (0x10000, 0x1000),
            (0x2F000, 0x1001),
            (0x4000, 0),
        ] {
            assert_eq!(
                parse(&[(0x1000, 0x1000), bad], 16, &mem),
                Err(BackingError::NotGuestRam {
                    addr: bad.0,
                    len: bad.1
                }),
                "{bad:x?}"
            );
        }
        assert_eq!(
            parse(&[(0x1000, 0x1000), (u64::MAX - 0xFFF, 0x1000)], 16, &mem),
            Err(BackingError::NotGuestRam {
                addr: u64::MAX - 0xFFF,
                len: 0x1000
            })
        );
    }

    #[test]
    fn entries_are_checked_against_guest_ram() {
        let mem = ram();
        let b = parse(&[(0x1000, 0x1000), (0x8000, 0x800)], 16, &mem).unwrap();
        assert_eq!(b.len(), 0x1800);
        assert_eq!(
            parse(&[(0xF800, 0x1000)], 16, &mem),
            Err(BackingError::NotGuestRam {
                addr: 0xF800,
                len: 0x1000
            })
        );
        assert!(parse(&[(u64::MAX - 10, 0x100)], 16, &mem).is_err(), "wraps");
        assert!(parse(&[(0x1000, 0)], 16, &mem).is_err(), "empty entry");
        assert_eq!(
            parse(&[(0x1000, 1); 17], 16, &mem),
            Err(BackingError::Count { count: 17, max: 16 })
        );
        assert_eq!(
            parse(&[], 16, &mem),
            Err(BackingError::Count { count: 0, max: 16 })
        );
    }

    #[test]
    fn adjacent_entries_are_merged_and_duplicates_kept() {
        let mem = ram();
        let list: Vec<(u64, u32)> = (0..64).map(|i| (0x1000 + i * 0x100, 0x100)).collect();
        let b = parse(&list, 64, &mem).unwrap();
        assert_eq!(b.entries, vec![(GuestAddress(0x1000), 0x4000)]);
        assert_eq!(backing_cost(&b), ENTRY_BYTES);
        let b = parse(
            &[(0x1000, 0x1000), (0x1000, 0x1000), (0x2000, 0x10)],
            16,
            &mem,
        )
        .unwrap();
        assert_eq!(
            b.entries,
            vec![
                (GuestAddress(0x1000), 0x1000),
                (GuestAddress(0x1000), 0x1010)
            ]
        );
        assert_eq!(backing_cost(&b), 2 * ENTRY_BYTES);
    }

    #[test]
    fn merged_entries_stay_below_4_gib() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_2000_0000)]).unwrap(),
        );
        let list = [
            (0, 0xFFFF_F000u32),
            (0xFFFF_F000, 0x2000),
            (0x1_0000_1000, 0x1000),
        ];
        let b = parse(&list, 16, &mem).unwrap();
        assert_eq!(
            b.entries,
            vec![
                (GuestAddress(0), 0xFFFF_F000),
                (GuestAddress(0xFFFF_F000), 0x3000)
            ]
        );
        assert_eq!(b.len(), 0x1_0000_2000);
    }

    #[test]
    fn reads_span_entries() {
        let mem = ram();
        mem.memory()
            .write_slice(&[1, 2, 3, 4], GuestAddress(0x1FFE))
            .unwrap();
        mem.memory()
            .write_slice(&[5, 6], GuestAddress(0x8000))
            .unwrap();
        let b = GuestBacking {
            entries: vec![
                (GuestAddress(0x1000), 0x1000),
                (GuestAddress(0x8000), 0x100),
            ],
        };
        let mut buf = [0u8; 4];
        read_backing(&mem, &b, 0xFFE, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 5, 6]);
        assert_eq!(
            read_backing(&mem, &b, 0x10FE, &mut buf),
            Err(BackingError::Read {
                offset: 0x10FE,
                len: 4
            }),
            "past the end"
        );
        let gone = GuestBacking {
            entries: vec![(GuestAddress(0x20000), 0x1000)],
        };
        assert!(read_backing(&mem, &gone, 0, &mut buf).is_err(), "not RAM");
    }
}
