//! The guest memory the device touches: the frontend's memory table, checked.
//!
//! A memory-table region is an mmap of a file the frontend sent. A region
//! that claims more bytes than its file has maps fine, but the first access
//! past the end of the file raises SIGBUS and kills the daemon. Every region
//! is therefore checked against its file's size (fstat) before the device
//! uses the table.
//!
//! vhost-user-backend 0.24 publishes a new table in the memory object it
//! shares with the vrings *before* it asks the backend
//! (`VhostUserBackend::update_memory`), so refusing there is not enough:
//! the device keeps its own memory object, which only ever holds checked
//! tables, and the device, the compute layer and every ring access
//! (descriptor reads, `add_used`, notification suppression) go through it.
//! A refused table is also taken back out of the shared object, so that
//! vhost-user-backend's own ring accesses (`SET_VRING_ADDR` reads the used
//! index) do not see it either.
//!
//! A frontend that shrinks a file after sending it is not covered: the
//! check sees the size at the time of the table (QEMU's memory backends
//! seal their memfds against shrinking).

use std::io;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The region runs past the end of its file.
    #[error(
        "region at {gpa:#x}: {size:#x} bytes from file offset {offset:#x} run past the end of its \
         file ({file_size:#x} bytes)"
    )]
    PastEndOfFile {
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        size: u64,
        /// Offset into the file.
        offset: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The region's file cannot be examined.
    #[error("region at {gpa:#x}: cannot stat its file: {source}")]
    Stat {
        /// Guest-physical start.
        gpa: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Checks that every region of `table` lies inside its file.
pub fn check_table(table: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for region in table.iter() {
        let Some(file) = region.file_offset() else {
            // Anonymous memory (never from vhost-user): no file to outrun.
            continue;
        };
        let gpa = region.start_addr().0;
        let size = region.len();
        let offset = file.start();
        let file_size = file
            .file()
            .metadata()
            .map_err(|source| MemoryError::Stat { gpa, source })?
            .len();
        if offset.checked_add(size).is_none_or(|end| end > file_size) {
            return Err(MemoryError::PastEndOfFile {
                gpa,
                size,
                offset,
                file_size,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::mmap::MmapRegion;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

    fn table(file_size: u64, offset: u64, size: usize) -> GuestMemoryMmap {
        let file = tempfile::tempfile().unwrap();
        file.set_len(file_size).unwrap();
        let mmap = MmapRegion::from_file(FileOffset::new(file, offset), size).unwrap();
        let region = GuestRegionMmap::new(mmap, GuestAddress(0x10_0000)).unwrap();
        GuestMemoryMmap::from_regions(vec![region]).unwrap()
    }

    #[test]
    fn regions_must_lie_inside_their_files() {
        check_table(&table(0x4000, 0, 0x4000)).unwrap();
        check_table(&table(0x8000, 0x4000, 0x4000)).unwrap();
        let e = check_table(&table(0x4000, 0, 0x8000)).unwrap_err();
        assert!(
            matches!(
                e,
                MemoryError::PastEndOfFile {
                    gpa: 0x10_0000,
                    size: 0x8000,
                    offset: 0,
                    file_size: 0x4000
                }
            ),
            "{e}"
        );
        assert!(check_table(&table(0x8000, 0x5000, 0x4000)).is_err());
        check_table(&GuestMemoryMmap::new()).unwrap();
    }
}
