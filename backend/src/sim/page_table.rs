//! Four-level page tables, as an x86-64 or AMD GPU MMU walks them.
//!
//! A 48-bit GPU VA splits into four 9-bit table indices and a 12-bit page
//! offset. The three upper levels are directories; the last level holds
//! page table entries: the guest-physical frame and the valid / read /
//! write / exec bits. Every translation walks the four levels, as hardware
//! does; tables are allocated on demand and freed when they empty, so an
//! unmap really gives the memory back.
//!
//! # Host memory and cost
//!
//! A hardware table is a 4 KiB page of 512 entries however few it uses, so
//! single pages scattered one per 2 MiB cost 4 KiB of table each. The
//! simulation stores a table with few entries *sparsely* (a sorted list of
//! `(index, entry)` pairs, at most [`SPARSE_MAX`]) and switches to the dense
//! 512-entry array once it fills up, back again when it drains to
//! [`SPARSE_MIN`]. The layers above cannot tell the difference: a walk still
//! visits four levels and the TLB and shootdown work as before; only host
//! memory is now proportional to the entries in use (8 bytes per page in a
//! dense table, about 16 in a sparse one, plus the tables themselves).
//!
//! Every table knows how many entries it uses, so an update visits only
//! the tables on the path to (or, for a range, inside) what it changes, and
//! frees the tables it empties on the way back up: the cost of a map or an
//! unmap is proportional to the range it touches, never to the size of the
//! tree.

use guest_proto::{AccessFlags, GpuVa, GuestPhysAddr, PAGE_SHIFT, Perms};

/// Entries per table.
const ENTRIES: usize = 512;
/// Bits of VA a level resolves.
const LEVEL_BITS: u32 = 9;
/// Levels in the walk.
pub const LEVELS: u32 = 4;
/// Width of a GPU VA.
pub const VA_BITS: u32 = PAGE_SHIFT + LEVEL_BITS * LEVELS;
/// Most entries a sparse table holds; one more makes it dense.
pub const SPARSE_MAX: usize = 64;
/// A dense table that drains to this many entries becomes sparse again
/// (half of [`SPARSE_MAX`], so a table at the boundary does not flip on
/// every update).
pub const SPARSE_MIN: usize = SPARSE_MAX / 2;

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

/// What a table holds: a value that may be absent.
trait Slot: Sized {
    fn absent() -> Self;
    fn is_present(&self) -> bool;
}

impl Slot for Pte {
    fn absent() -> Pte {
        Pte::default()
    }

    fn is_present(&self) -> bool {
        self.is_valid()
    }
}

impl Slot for Option<Box<Node>> {
    fn absent() -> Self {
        None
    }

    fn is_present(&self) -> bool {
        self.is_some()
    }
}

/// One table of 512 slots, stored sparsely or densely (see the module docs).
enum Table<S> {
    /// The present slots, sorted by index; at most [`SPARSE_MAX`].
    Sparse(Vec<(u16, S)>),
    /// All 512 slots and how many are present.
    Dense { live: usize, slots: Box<[S]> },
}

impl<S: Slot> Table<S> {
    fn new() -> Table<S> {
        Table::Sparse(Vec::new())
    }

    /// Present slots.
    fn len(&self) -> usize {
        match self {
            Table::Sparse(v) => v.len(),
            Table::Dense { live, .. } => *live,
        }
    }

    fn get(&self, i: usize) -> Option<&S> {
        match self {
            Table::Sparse(v) => find(v, i).and_then(|at| v.get(at)).map(|(_, s)| s),
            Table::Dense { slots, .. } => slots.get(i).filter(|s| s.is_present()),
        }
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut S> {
        match self {
            Table::Sparse(v) => match find(v, i) {
                Some(at) => v.get_mut(at).map(|(_, s)| s),
                None => None,
            },
            Table::Dense { slots, .. } => slots.get_mut(i).filter(|s| s.is_present()),
        }
    }

    /// Stores `value` (present) at `i`; returns the previous slot.
    fn insert(&mut self, i: usize, value: S) -> S {
        if let Table::Sparse(v) = self {
            match v.binary_search_by_key(&(i as u16), |(k, _)| *k) {
                Ok(at) => {
                    if let Some((_, s)) = v.get_mut(at) {
                        return std::mem::replace(s, value);
                    }
                    return S::absent();
                }
                Err(at) if v.len() < SPARSE_MAX => {
                    // Grow by doubling from one entry: most sparse tables
                    // hold one or a few.
                    if v.len() == v.capacity() {
                        v.reserve_exact(v.len().max(1));
                    }
                    v.insert(at, (i as u16, value));
                    return S::absent();
                }
                Err(_) => self.densify(),
            }
        }
        match self {
            Table::Dense { live, slots } => match slots.get_mut(i) {
                Some(s) => {
                    let old = std::mem::replace(s, value);
                    if !old.is_present() {
                        *live += 1;
                    }
                    old
                }
                None => S::absent(),
            },
            Table::Sparse(_) => S::absent(),
        }
    }

    /// Calls `f` on every present slot with an index in `lo..=hi`, in index
    /// order; a slot for which `f` returns false is emptied. Visits only
    /// that index range of a dense table.
    fn retain_range(&mut self, lo: usize, hi: usize, mut f: impl FnMut(usize, &mut S) -> bool) {
        match self {
            Table::Sparse(v) => {
                let first = v.partition_point(|(k, _)| usize::from(*k) < lo);
                let mut at = first;
                while let Some((k, s)) = v.get_mut(at) {
                    let k = usize::from(*k);
                    if k > hi {
                        break;
                    }
                    if f(k, s) {
                        at += 1;
                    } else {
                        v.remove(at);
                    }
                }
            }
            Table::Dense { live, slots } => {
                for (k, s) in slots.iter_mut().enumerate().take(hi + 1).skip(lo) {
                    if s.is_present() && !f(k, s) {
                        *s = S::absent();
                        *live -= 1;
                    }
                }
            }
        }
        self.maybe_sparsify();
        self.maybe_shrink();
    }

    /// Gives back the spare capacity of a sparse table that drained to a
    /// quarter of it.
    fn maybe_shrink(&mut self) {
        if let Table::Sparse(v) = self {
            if v.len() <= v.capacity() / 4 {
                v.shrink_to(v.capacity() / 2);
            }
        }
    }

    fn densify(&mut self) {
        if let Table::Sparse(v) = self {
            let mut slots: Box<[S]> = (0..ENTRIES).map(|_| S::absent()).collect();
            let live = v.len();
            for (k, s) in v.drain(..) {
                if let Some(slot) = slots.get_mut(usize::from(k)) {
                    *slot = s;
                }
            }
            *self = Table::Dense { live, slots };
        }
    }

    fn maybe_sparsify(&mut self) {
        if let Table::Dense { live, slots } = self {
            if *live <= SPARSE_MIN {
                let mut v = Vec::with_capacity(*live);
                for (k, s) in slots.iter_mut().enumerate() {
                    if s.is_present() {
                        v.push((k as u16, std::mem::replace(s, S::absent())));
                    }
                }
                *self = Table::Sparse(v);
            }
        }
    }

    /// Host bytes of the table's own storage.
    fn bytes(&self) -> usize {
        match self {
            Table::Sparse(v) => v.capacity() * std::mem::size_of::<(u16, S)>(),
            Table::Dense { slots, .. } => slots.len() * std::mem::size_of::<S>(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &S> {
        let (sparse, dense) = match self {
            Table::Sparse(v) => (Some(v.iter().map(|(_, s)| s)), None),
            Table::Dense { slots, .. } => (None, Some(slots.iter().filter(|s| s.is_present()))),
        };
        sparse
            .into_iter()
            .flatten()
            .chain(dense.into_iter().flatten())
    }
}

/// The position of index `i` in a sparse table. Tables usually hold runs
/// of consecutive indices (a buffer's pages, or one page per 2 MiB span one
/// level up), so the position `i - first index` is tried first; otherwise a
/// binary search, at most log2(64) = 6 steps.
#[inline]
fn find<S>(v: &[(u16, S)], i: usize) -> Option<usize> {
    let key = i as u16;
    let first = usize::from(v.first()?.0);
    if let Some(guess) = i.checked_sub(first) {
        if v.get(guess).is_some_and(|(k, _)| *k == key) {
            return Some(guess);
        }
    }
    v.binary_search_by_key(&key, |(k, _)| *k).ok()
}

enum Node {
    Dir(Table<Option<Box<Node>>>),
    Leaf(Table<Pte>),
}

impl Node {
    fn new(level: u32) -> Node {
        if level + 1 == LEVELS {
            Node::Leaf(Table::new())
        } else {
            Node::Dir(Table::new())
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Node::Dir(t) => t.len() == 0,
            Node::Leaf(t) => t.len() == 0,
        }
    }

    /// Host bytes of this table and everything below it.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Node>()
            + match self {
                Node::Dir(t) => {
                    t.bytes()
                        + t.iter()
                            .filter_map(Option::as_deref)
                            .map(Node::bytes)
                            .sum::<usize>()
                }
                Node::Leaf(t) => t.bytes(),
            }
    }

    /// Tables in this subtree.
    fn count(&self) -> usize {
        1 + match self {
            Node::Dir(t) => t
                .iter()
                .filter_map(Option::as_deref)
                .map(Node::count)
                .sum::<usize>(),
            Node::Leaf(_) => 0,
        }
    }
}

fn index(va: u64, level: u32) -> usize {
    let shift = PAGE_SHIFT + LEVEL_BITS * (LEVELS - 1 - level);
    ((va >> shift) as usize) & (ENTRIES - 1)
}

/// Bytes of VA one entry of a table at `level` covers.
fn entry_span(level: u32) -> u64 {
    1u64 << (PAGE_SHIFT + LEVEL_BITS * (LEVELS - 1 - level))
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

    /// The entry for the page of `va` (invalid if unmapped): a walk of the
    /// four levels.
    pub fn walk(&self, va: GpuVa) -> Pte {
        if !Self::in_range(va) {
            return Pte::default();
        }
        let mut node = &self.root;
        for level in 0..LEVELS {
            match node {
                Node::Dir(d) => match d.get(index(va.raw(), level)).and_then(Option::as_deref) {
                    Some(next) => node = next,
                    None => return Pte::default(),
                },
                Node::Leaf(l) => return l.get(index(va.raw(), level)).copied().unwrap_or_default(),
            }
        }
        Pte::default()
    }

    /// Sets the entry of the page at `va` (which the caller checked is in
    /// range and page-aligned); an invalid `pte` clears it, freeing tables
    /// that empty. Returns the previous entry. Visits the four tables of
    /// the walk and no other.
    pub fn set(&mut self, va: GpuVa, pte: Pte) -> Pte {
        if !Self::in_range(va) {
            return Pte::default();
        }
        if !pte.is_valid() {
            let old = self.walk(va);
            if old.is_valid() {
                self.clear_range(va.page_down(), 1 << PAGE_SHIFT);
            }
            return old;
        }
        let mut node = &mut self.root;
        let mut level = 0;
        loop {
            self.visited += 1;
            match node {
                Node::Dir(d) => {
                    let i = index(va.raw(), level);
                    if d.get(i).is_none() {
                        d.insert(i, Some(Box::new(Node::new(level + 1))));
                    }
                    match d.get_mut(i).and_then(Option::as_deref_mut) {
                        Some(next) => node = next,
                        None => return Pte::default(),
                    }
                    level += 1;
                }
                Node::Leaf(l) => {
                    let old = l.insert(index(va.raw(), level), pte);
                    if !old.is_valid() {
                        self.mapped_pages += 1;
                    }
                    return old;
                }
            }
        }
    }

    /// Clears every entry of `[va, va + len)` and frees the tables that
    /// empty. Returns how many pages were mapped. Visits only the tables
    /// that overlap the range and exist.
    pub fn clear_range(&mut self, va: GpuVa, len: u64) -> u64 {
        let start = va.raw().min(1 << VA_BITS);
        let end = va.raw().saturating_add(len).min(1 << VA_BITS);
        if start >= end {
            return 0;
        }
        let mut cleared = 0;
        clear_in(
            &mut self.root,
            0,
            0,
            start,
            end - 1,
            &mut cleared,
            &mut self.visited,
        );
        self.mapped_pages -= cleared;
        cleared
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
        self.root.bytes()
    }
}

/// Clears the entries of `node` (a table at `level` whose first entry
/// covers `base`) for the VAs `first..=last`, which lie inside the node's
/// span; empties and frees child tables on the way back up.
fn clear_in(
    node: &mut Node,
    level: u32,
    base: u64,
    first: u64,
    last: u64,
    cleared: &mut u64,
    visited: &mut u64,
) {
    *visited += 1;
    let (lo, hi) = (index(first, level), index(last, level));
    let span = entry_span(level);
    match node {
        Node::Leaf(l) => l.retain_range(lo, hi, |_, _| {
            *cleared += 1;
            false
        }),
        Node::Dir(d) => d.retain_range(lo, hi, |i, child| {
            let Some(child) = child.as_deref_mut() else {
                return false;
            };
            let child_base = base + i as u64 * span;
            let child_last = child_base + (span - 1);
            clear_in(
                child,
                level + 1,
                child_base,
                first.max(child_base),
                last.min(child_last),
                cleared,
                visited,
            );
            !child.is_empty()
        }),
    }
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
        // Root, and one table per level for the page left.
        assert_eq!(pt.tables(), 4);
        assert_eq!(pt.clear_range(GpuVa(0x8000_0000_0000), 1 << 47), 1);
        assert_eq!(pt.tables(), 1, "emptied tables are freed");
    }

    #[test]
    fn read_only_pages_refuse_writes_and_atomics() {
        let pte = Pte::new(GuestPhysAddr(0x3000), Perms::READ);
        assert!(pte.allows(AccessFlags::READ));
        assert!(!pte.allows(AccessFlags::WRITE));
        assert!(!pte.allows(AccessFlags::ATOMIC));
    }

    /// Random maps, single clears and range clears over a window of a few
    /// tables (so they keep changing form) agree with a plain map at every
    /// step, and the tables' own count of mapped pages stays exact.
    #[test]
    fn random_updates_agree_with_an_oracle() {
        let mut pt = PageTable::default();
        let mut oracle = std::collections::HashMap::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Four leaves' worth in one directory, plus four far-apart pages.
        let window = |r: u64| {
            if r.is_multiple_of(64) {
                GpuVa((r % 4) << 39 | 0x7000)
            } else {
                GpuVa(0x4000_0000 + (r % 2048) * 0x1000)
            }
        };
        let mut dense_seen = false;
        for step in 0..40_000u64 {
            let r = next();
            let va = window(r >> 8);
            match r % 64 {
                0..=39 => {
                    let pte = Pte::new(GuestPhysAddr((r >> 20) << 12), Perms::RW);
                    let old = pt.set(va, pte);
                    assert_eq!(old, oracle.insert(va.raw(), pte).unwrap_or_default());
                }
                40..=61 => {
                    let old = pt.set(va, Pte::default());
                    assert_eq!(old, oracle.remove(&va.raw()).unwrap_or_default());
                }
                _ => {
                    let len = (r >> 40) % 100 * 0x1000;
                    let end = va.raw() + len;
                    let before = oracle.len();
                    oracle.retain(|&k, _| k < va.raw() || k >= end);
                    assert_eq!(pt.clear_range(va, len), (before - oracle.len()) as u64);
                }
            }
            assert_eq!(pt.mapped_pages(), oracle.len() as u64, "step {step}");
            if step % 97 == 0 {
                // A dense leaf alone takes 4 KiB.
                dense_seen |= pt.table_bytes() >= ENTRIES * 8;
                for probe in 0..64u64 {
                    let va = window(next());
                    let want = oracle.get(&va.raw()).copied().unwrap_or_default();
                    assert_eq!(pt.walk(va), want, "step {step}, probe {probe}");
                }
            }
        }
        for (va, pte) in &oracle {
            assert_eq!(pt.walk(GpuVa(*va)), *pte);
        }
        assert!(dense_seen, "no table went dense");
    }

    /// A table switches between its sparse and dense forms as it fills and
    /// drains; every entry survives both ways, and a partial clear of a
    /// dense table clears exactly its range.
    #[test]
    fn tables_change_form_without_losing_entries() {
        let mut pt = PageTable::default();
        let frame = |i: u64| GuestPhysAddr(0x100_0000 + i * 0x1000);
        for i in 0..ENTRIES as u64 {
            pt.set(GpuVa(0x20_0000 + i * 0x1000), Pte::new(frame(i), Perms::RW));
        }
        assert_eq!(pt.mapped_pages(), 512);
        assert!((0..512u64).all(|i| pt.walk(GpuVa(0x20_0000 + i * 0x1000)).frame() == frame(i)));
        // Clear [1, 511): two entries stay, the table goes sparse.
        assert_eq!(pt.clear_range(GpuVa(0x20_1000), 510 * 0x1000), 510);
        assert_eq!(pt.walk(GpuVa(0x20_0000)).frame(), frame(0));
        assert_eq!(pt.walk(GpuVa(0x3F_F000)).frame(), frame(511));
        assert!(!pt.walk(GpuVa(0x20_1000)).is_valid());
        assert_eq!(pt.mapped_pages(), 2);
        // Refill past the threshold one by one, then clear singly.
        for i in 1..511u64 {
            pt.set(
                GpuVa(0x20_0000 + i * 0x1000),
                Pte::new(frame(i), Perms::READ),
            );
        }
        for i in (0..512u64).step_by(2) {
            assert!(
                pt.set(GpuVa(0x20_0000 + i * 0x1000), Pte::default())
                    .is_valid()
            );
        }
        assert_eq!(pt.mapped_pages(), 256);
        assert!(
            (0..512u64).all(|i| pt.walk(GpuVa(0x20_0000 + i * 0x1000)).is_valid() == (i % 2 == 1))
        );
        assert!(!pt.walk(GpuVa(0x20_1000)).allows(AccessFlags::WRITE));
        assert_eq!(pt.clear_range(GpuVa(0), 1 << 48), 256);
        assert_eq!(pt.tables(), 1);
    }
}
