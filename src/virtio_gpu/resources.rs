//! virtio-gpu resources and their guest backing.
//!
//! A resource is an id the guest chose, a kind, a size, and (once attached)
//! a list of guest-physical ranges. Every range is checked against guest
//! RAM when it is attached, the entry count is bounded, and lengths are
//! summed without overflow; reads and writes go through vm-memory.

use std::collections::BTreeSet;
use std::sync::Arc;

use gpu_backend::GuestRam;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::wire::Cursor;
use crate::context_backend::{CtxId, GuestBacking, ResourceId, ResourceKind, ResourceView};

/// Why backing entries were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BackingError {
    /// More entries than allowed, or fewer bytes than announced.
    #[error("bad entry count {0}")]
    Count(u32),
    /// An entry is not inside guest RAM (or has length 0).
    #[error("entry {addr:#x}+{len:#x} is not guest RAM")]
    NotGuestRam {
        /// Start.
        addr: u64,
        /// Length.
        len: u32,
    },
}

/// Host bytes one stored backing entry takes.
pub const ENTRY_BYTES: u64 = std::mem::size_of::<(GuestAddress, u32)>() as u64;

/// Host bytes a backing's entry list takes (what the per-guest budget
/// counts).
pub fn backing_cost(backing: &GuestBacking) -> u64 {
    (backing.entries.capacity() as u64).saturating_mul(ENTRY_BYTES)
}

/// Parses and checks `count` memory entries. An entry that continues the
/// previous one in guest memory is merged into it, so a backing costs host
/// memory for its discontiguous pieces only; duplicates stay separate (and
/// are paid for).
pub fn parse_entries(
    r: &mut Cursor<'_>,
    count: u32,
    max: u32,
    mem: &GuestRam,
) -> Result<GuestBacking, BackingError> {
    if count == 0 || count > max {
        return Err(BackingError::Count(count));
    }
    let guard = mem.memory();
    let raw = r
        .take((count as usize).saturating_mul(16))
        .ok_or(BackingError::Count(count))?;
    let mut entries: Vec<(GuestAddress, u32)> = Vec::new();
    for entry in raw.chunks_exact(16) {
        let mut e = Cursor::new(entry);
        let (Some(addr), Some(len)) = (e.u64(), e.u32()) else {
            return Err(BackingError::Count(count));
        };
        if len == 0 || !guard.check_range(GuestAddress(addr), len as usize) {
            return Err(BackingError::NotGuestRam { addr, len });
        }
        if let Some((last, last_len)) = entries.last_mut() {
            let continues = last.0.checked_add(u64::from(*last_len)) == Some(addr);
            if let (true, Some(merged)) = (continues, last_len.checked_add(len)) {
                *last_len = merged;
                continue;
            }
        }
        entries.push((GuestAddress(addr), len));
    }
    entries.shrink_to_fit();
    Ok(GuestBacking { entries })
}

/// Copies `buf.len()` bytes from byte `offset` of the backing.
pub fn read_backing(mem: &GuestRam, backing: &GuestBacking, offset: u64, buf: &mut [u8]) -> bool {
    let guard = mem.memory();
    let mut entry_start = 0u64;
    let mut done = 0usize;
    for (addr, len) in &backing.entries {
        let len = u64::from(*len);
        let entry_end = entry_start + len;
        let want = offset + done as u64;
        if want < entry_end && done < buf.len() {
            let skip = want - entry_start;
            let n = ((len - skip) as usize).min(buf.len() - done);
            let Some(chunk) = buf.get_mut(done..done + n) else {
                return false;
            };
            if guard
                .read_slice(chunk, GuestAddress(addr.0 + skip))
                .is_err()
            {
                return false;
            }
            done += n;
        }
        entry_start = entry_end;
    }
    done == buf.len()
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

    fn entries(list: &[(u64, u32)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (a, l) in list {
            b.extend_from_slice(&a.to_le_bytes());
            b.extend_from_slice(&l.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        b
    }

    #[test]
    fn entries_are_checked_against_guest_ram() {
        let mem = ram();
        let ok = entries(&[(0x1000, 0x1000), (0x8000, 0x800)]);
        let b = parse_entries(&mut Cursor::new(&ok), 2, 16, &mem).unwrap();
        assert_eq!(b.len(), 0x1800);
        let outside = entries(&[(0xF800, 0x1000)]);
        assert_eq!(
            parse_entries(&mut Cursor::new(&outside), 1, 16, &mem),
            Err(BackingError::NotGuestRam {
                addr: 0xF800,
                len: 0x1000
            })
        );
        let wrap = entries(&[(u64::MAX - 10, 0x100)]);
        assert!(parse_entries(&mut Cursor::new(&wrap), 1, 16, &mem).is_err());
        assert_eq!(
            parse_entries(&mut Cursor::new(&ok), 3, 16, &mem),
            Err(BackingError::Count(3))
        );
        assert_eq!(
            parse_entries(&mut Cursor::new(&ok), 17, 16, &mem),
            Err(BackingError::Count(17))
        );
        assert_eq!(
            parse_entries(&mut Cursor::new(&ok), 0, 16, &mem),
            Err(BackingError::Count(0))
        );
    }

    #[test]
    fn adjacent_entries_are_merged_and_duplicates_kept() {
        let mem = ram();
        let list: Vec<(u64, u32)> = (0..64).map(|i| (0x1000 + i * 0x100, 0x100)).collect();
        let b = parse_entries(&mut Cursor::new(&entries(&list)), 64, 64, &mem).unwrap();
        assert_eq!(b.entries, vec![(GuestAddress(0x1000), 0x4000)]);
        assert_eq!(backing_cost(&b), ENTRY_BYTES);
        let dup = entries(&[(0x1000, 0x1000), (0x1000, 0x1000), (0x2000, 0x10)]);
        let b = parse_entries(&mut Cursor::new(&dup), 3, 16, &mem).unwrap();
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
        let b = parse_entries(&mut Cursor::new(&entries(&list)), 3, 16, &mem).unwrap();
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
        assert!(read_backing(&mem, &b, 0xFFE, &mut buf));
        assert_eq!(buf, [1, 2, 5, 6]);
        assert!(!read_backing(&mem, &b, 0x10FE, &mut buf), "past the end");
    }
}
