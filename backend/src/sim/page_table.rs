//! Four-level page tables, as an x86-64 or AMD GPU MMU walks them.
//!
//! A 48-bit GPU VA splits into four 9-bit table indices and a 12-bit page
//! offset. The three upper levels are directories; the last level holds
//! page table entries: the guest-physical frame and the valid / read /
//! write / exec bits. Directories are allocated on demand and freed when
//! they empty, so an unmap really gives the memory back.

use guest_proto::{AccessFlags, GpuVa, GuestPhysAddr, PAGE_SHIFT, Perms};

/// Entries per table.
const ENTRIES: usize = 512;
/// Bits of VA a level resolves.
const LEVEL_BITS: u32 = 9;
/// Levels in the walk.
pub const LEVELS: u32 = 4;
/// Width of a GPU VA.
pub const VA_BITS: u32 = PAGE_SHIFT + LEVEL_BITS * LEVELS;

/// A page table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pte(u64);

impl Pte {
    const VALID: u64 = 1 << 0;
    const READ: u64 = 1 << 1;
    const WRITE: u64 = 1 << 2;
    const EXEC: u64 = 1 << 3;
    const FRAME_MASK: u64 = !((1 << PAGE_SHIFT) - 1);

    /// A valid entry for `frame` with `perms`.
    pub fn new(frame: GuestPhysAddr, perms: Perms) -> Pte {
        let mut bits = Self::VALID | (frame.raw() & Self::FRAME_MASK);
        if perms.contains(Perms::READ) {
            bits |= Self::READ;
        }
        if perms.contains(Perms::WRITE) {
            bits |= Self::WRITE;
        }
        if perms.contains(Perms::EXEC) {
            bits |= Self::EXEC;
        }
        Pte(bits)
    }

    /// Whether the entry maps a page.
    pub fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }

    /// The guest-physical frame.
    pub fn frame(self) -> GuestPhysAddr {
        GuestPhysAddr(self.0 & Self::FRAME_MASK)
    }

    /// Whether the entry allows `access`.
    pub fn allows(self, access: AccessFlags) -> bool {
        let need = access.required_perms();
        self.is_valid()
            && (!need.contains(Perms::READ) || self.0 & Self::READ != 0)
            && (!need.contains(Perms::WRITE) || self.0 & Self::WRITE != 0)
            && (!need.contains(Perms::EXEC) || self.0 & Self::EXEC != 0)
    }
}

enum Node {
    Dir(Box<[Option<Box<Node>>]>),
    Leaf(Box<[Pte]>),
}

impl Node {
    fn new(level: u32) -> Node {
        if level + 1 == LEVELS {
            Node::Leaf(vec![Pte::default(); ENTRIES].into_boxed_slice())
        } else {
            Node::Dir((0..ENTRIES).map(|_| None).collect())
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Node::Dir(d) => d.iter().all(Option::is_none),
            Node::Leaf(l) => l.iter().all(|p| !p.is_valid()),
        }
    }
}

fn index(va: GpuVa, level: u32) -> usize {
    let shift = PAGE_SHIFT + LEVEL_BITS * (LEVELS - 1 - level);
    ((va.raw() >> shift) as usize) & (ENTRIES - 1)
}

/// The page tables of one GPU VM.
pub struct PageTable {
    root: Node,
    mapped_pages: u64,
    /// Tables visited by updates so far (see [`PageTable::tables_visited`]).
    visited: u64,
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTable")
            .field("mapped_pages", &self.mapped_pages)
            .finish()
    }
}

impl Default for PageTable {
    fn default() -> PageTable {
        PageTable {
            root: Node::new(0),
            mapped_pages: 0,
            visited: 0,
        }
    }
}

impl PageTable {
    /// Whether `va` is inside the 48-bit space.
    pub fn in_range(va: GpuVa) -> bool {
        va.raw() >> VA_BITS == 0
    }

    /// The entry for the page of `va` (invalid if unmapped).
    pub fn walk(&self, va: GpuVa) -> Pte {
        if !Self::in_range(va) {
            return Pte::default();
        }
        let mut node = &self.root;
        for level in 0..LEVELS {
            match node {
                Node::Dir(d) => match d.get(index(va, level)).and_then(Option::as_deref) {
                    Some(next) => node = next,
                    None => return Pte::default(),
                },
                Node::Leaf(l) => return l.get(index(va, level)).copied().unwrap_or_default(),
            }
        }
        Pte::default()
    }

    /// Sets the entry of the page at `va` (which the caller checked is in
    /// range and page-aligned). Returns the previous entry.
    pub fn set(&mut self, va: GpuVa, pte: Pte) -> Pte {
        let mut node = &mut self.root;
        for level in 0..LEVELS {
            self.visited += 1;
            match node {
                Node::Dir(d) => {
                    let Some(slot) = d.get_mut(index(va, level)) else {
                        return Pte::default();
                    };
                    node = slot.get_or_insert_with(|| Box::new(Node::new(level + 1)));
                }
                Node::Leaf(l) => {
                    let Some(entry) = l.get_mut(index(va, level)) else {
                        return Pte::default();
                    };
                    let old = std::mem::replace(entry, pte);
                    match (old.is_valid(), pte.is_valid()) {
                        (false, true) => self.mapped_pages += 1,
                        (true, false) => self.mapped_pages -= 1,
                        _ => {}
                    }
                    return old;
                }
            }
        }
        Pte::default()
    }

    /// Clears every entry of `[va, va + len)` and frees emptied tables.
    /// Returns how many pages were mapped.
    pub fn clear_range(&mut self, va: GpuVa, len: u64) -> u64 {
        let mut cleared = 0;
        let mut at = va.raw();
        let end = va.raw().saturating_add(len).min(1 << VA_BITS);
        while at < end {
            // Skip absent directories wholesale.
            match self.absent_span(GpuVa(at)) {
                Some(span) => at = (at | (span - 1)).saturating_add(1),
                None => {
                    if self.set(GpuVa(at), Pte::default()).is_valid() {
                        cleared += 1;
                    }
                    at += 1 << PAGE_SHIFT;
                }
            }
        }
        self.visited += prune(&mut self.root);
        cleared
    }

    /// If the walk for `va` stops at a missing directory, the size of the
    /// VA span that directory would cover.
    fn absent_span(&self, va: GpuVa) -> Option<u64> {
        let mut node = &self.root;
        for level in 0..LEVELS {
            match node {
                Node::Dir(d) => match d.get(index(va, level)).and_then(Option::as_deref) {
                    Some(next) => node = next,
                    None => return Some(1u64 << (PAGE_SHIFT + LEVEL_BITS * (LEVELS - 1 - level))),
                },
                Node::Leaf(_) => return None,
            }
        }
        None
    }

    /// Pages mapped.
    pub fn mapped_pages(&self) -> u64 {
        self.mapped_pages
    }

    /// Drops every table.
    pub fn clear(&mut self) {
        let visited = self.visited;
        *self = PageTable::default();
        self.visited = visited;
    }

    /// Tables visited by [`set`](Self::set) and
    /// [`clear_range`](Self::clear_range) since the page tables were
    /// created: the work updates did, for tests and statistics.
    pub fn tables_visited(&self) -> u64 {
        self.visited
    }

    /// Tables allocated, the root included.
    pub fn tables(&self) -> usize {
        self.root.count()
    }

    /// Host bytes the tables take (their storage as allocated; walks every
    /// table, for tests and statistics).
    pub fn table_bytes(&self) -> usize {
        self.root.count() * (std::mem::size_of::<Node>() + ENTRIES * 8)
    }
}

impl Node {
    fn count(&self) -> usize {
        1 + match self {
            Node::Dir(d) => d.iter().flatten().map(|c| c.count()).sum::<usize>(),
            Node::Leaf(_) => 0,
        }
    }
}

/// Prunes emptied tables below `node`; returns the tables visited.
fn prune(node: &mut Node) -> u64 {
    let mut visited = 1;
    if let Node::Dir(d) = node {
        for slot in d.iter_mut() {
            if let Some(child) = slot {
                visited += prune(child);
                if child.is_empty() {
                    *slot = None;
                }
            }
        }
    }
    visited
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_walk_unmap_across_directories() {
        let mut pt = PageTable::default();
        let vas = [
            0x1000u64,
            0x20_0000,
            0x4000_0000,
            0x7FFF_FFFF_F000,
            0x8000_0000_0000,
        ];
        for (i, va) in vas.iter().enumerate() {
            let frame = GuestPhysAddr(0x10_0000 + i as u64 * 0x1000);
            assert!(!pt.set(GpuVa(*va), Pte::new(frame, Perms::RW)).is_valid());
        }
        assert_eq!(pt.mapped_pages(), 5);
        let pte = pt.walk(GpuVa(0x4000_0123));
        assert_eq!(pte.frame(), GuestPhysAddr(0x10_2000));
        assert!(pte.allows(AccessFlags::WRITE));
        assert!(!pte.allows(AccessFlags::EXEC));
        assert!(!pt.walk(GpuVa(0x5000)).is_valid());
        assert!(!pt.walk(GpuVa(1 << 48)).is_valid());
        assert_eq!(pt.clear_range(GpuVa(0), 1 << 47), 4);
        assert_eq!(pt.mapped_pages(), 1);
        assert!(pt.walk(GpuVa(0x8000_0000_0000)).is_valid());
        assert!(!pt.walk(GpuVa(0x20_0000)).is_valid());
    }

    #[test]
    fn read_only_pages_refuse_writes_and_atomics() {
        let pte = Pte::new(GuestPhysAddr(0x3000), Perms::READ);
        assert!(pte.allows(AccessFlags::READ));
        assert!(!pte.allows(AccessFlags::WRITE));
        assert!(!pte.allows(AccessFlags::ATOMIC));
    }
}
