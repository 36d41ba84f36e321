//! A compute unit's TLB.
//!
//! Each compute unit (worker thread) owns a small direct-mapped TLB, so a
//! hit costs no lock and no shared cache line. Entries are tagged with the
//! VM and the VM's *translation generation*; an unmap bumps the generation
//! (the shootdown), which invalidates every CU's entries for that VM at
//! once without touching them. The unmap then waits for accesses in flight
//! to drain (see `vm.rs`), so no stale entry can be used afterwards.

use guest_proto::{GpuVa, PAGE_SHIFT};

use super::page_table::Pte;

/// Entries per TLB.
pub const TLB_ENTRIES: usize = 64;

#[derive(Clone, Copy, Default)]
struct Entry {
    vm: u64,
    generation: u64,
    vpn: u64,
    pte: Pte,
}

/// A direct-mapped TLB.
pub struct Tlb {
    entries: Box<[Entry; TLB_ENTRIES]>,
    hits: u64,
    misses: u64,
}

impl std::fmt::Debug for Tlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tlb")
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .finish()
    }
}

impl Default for Tlb {
    fn default() -> Tlb {
        Tlb {
            entries: Box::new([Entry::default(); TLB_ENTRIES]),
            hits: 0,
            misses: 0,
        }
    }
}

impl Tlb {
    /// The cached entry for `va` in `vm` at `generation`, if any.
    #[inline]
    pub fn lookup(&mut self, vm: u64, generation: u64, va: GpuVa) -> Option<Pte> {
        let vpn = va.raw() >> PAGE_SHIFT;
        let e = self.entries[(vpn as usize) % TLB_ENTRIES];
        if e.vm == vm && e.generation == generation && e.vpn == vpn && e.pte.is_valid() {
            self.hits += 1;
            Some(e.pte)
        } else {
            self.misses += 1;
            None
        }
    }

    /// Caches a valid entry.
    #[inline]
    pub fn insert(&mut self, vm: u64, generation: u64, va: GpuVa, pte: Pte) {
        let vpn = va.raw() >> PAGE_SHIFT;
        self.entries[(vpn as usize) % TLB_ENTRIES] = Entry {
            vm,
            generation,
            vpn,
            pte,
        };
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_proto::{GuestPhysAddr, Perms};

    #[test]
    fn generation_and_vm_tags_invalidate() {
        let mut tlb = Tlb::default();
        let pte = Pte::new(GuestPhysAddr(0x5000), Perms::RW);
        tlb.insert(1, 7, GpuVa(0x1000), pte);
        assert_eq!(tlb.lookup(1, 7, GpuVa(0x1abc)), Some(pte));
        assert_eq!(tlb.lookup(1, 8, GpuVa(0x1000)), None, "shot down");
        assert_eq!(tlb.lookup(2, 7, GpuVa(0x1000)), None, "other VM");
        assert_eq!(
            tlb.lookup(1, 7, GpuVa(0x41000)),
            None,
            "same set, other page"
        );
        assert_eq!(tlb.stats(), (1, 3));
    }
}
