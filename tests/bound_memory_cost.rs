//! What a bound byte costs the host: the figure behind the 64 GiB default
//! of `--max-bound-bytes` (docs/protocol.md section 12).
//!
//! Binds 1 GiB (262144 pages) into the simulated GPU's page table and
//! measures the process's resident memory before and after; the baseline in
//! the same run is a written `Vec<u64>` of one entry per page, which is
//! also what the guest-physical page list of a binding costs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use gpu_backend::sim::page_table::{PageTable, Pte};
use guest_proto::{GpuVa, GuestPhysAddr, PAGE_SIZE, Perms};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

#[test]
fn a_bound_page_costs_the_host_about_eight_bytes_of_page_table() {
    const PAGES: u64 = (1 << 30) / PAGE_SIZE;
    let base_va = 0x7f00_0000_0000u64;

    let before = resident_bytes();
    let mut pt = PageTable::default();
    for i in 0..PAGES {
        // Scattered guest frames, as a real guest's pages are.
        let gpa = ((i * 7919) % PAGES) * PAGE_SIZE;
        pt.set(
            GpuVa(base_va + i * PAGE_SIZE),
            Pte::new(GuestPhysAddr(gpa), Perms::RW),
        );
    }
    let table = resident_bytes() - before;
    assert_eq!(pt.mapped_pages(), PAGES);

    let before = resident_bytes();
    let list: Vec<u64> = (0..PAGES)
        .map(|i| ((i * 7919) % PAGES) * PAGE_SIZE)
        .collect();
    let baseline = resident_bytes() - before;
    assert_eq!(list.len() as u64, PAGES);

    let per_page = table as f64 / PAGES as f64;
    let base_per_page = baseline as f64 / PAGES as f64;
    println!(
        "1 GiB bound: page table {:.1} MiB = {per_page:.2} bytes per 4 KiB page; \
         baseline Vec<u64> page list {:.1} MiB = {base_per_page:.2} bytes per page; \
         64 GiB bound: {:.0} MiB of page table (+{:.0} MiB for a page-list binding)",
        table as f64 / f64::from(1 << 20),
        baseline as f64 / f64::from(1 << 20),
        per_page * 64.0 * PAGES as f64 / f64::from(1 << 20),
        base_per_page * 64.0 * PAGES as f64 / f64::from(1 << 20),
    );
    // One 8-byte entry per page plus the upper levels (1/512 of that).
    assert!(
        per_page < 9.0,
        "page table costs {per_page:.2} bytes per page"
    );
    assert!(base_per_page < 9.0);
    drop(pt);
}
