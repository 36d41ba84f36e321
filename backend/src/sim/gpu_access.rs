//! Memory accesses of the command processor's engines, one *step* at a time.
//!
//! The copy engine and the packet processor reach memory exactly as a
//! kernel's wave does: every access is translated by the engine's own TLB
//! or a walk of the VM's page tables, and a step holds the page-table lock
//! for reading while it translates *and* accesses (see `vm.rs`), so an
//! unmap waits for the step in flight and no access through a removed
//! translation can follow it. Every helper translates all the addresses it
//! needs before it writes anything: a step that faults has had no effect.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use guest_proto::{AccessFlags, GpuVa, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, VolatileMemory};

use super::kernels::{Mmu, StepOutcome};
use super::tlb::Tlb;
use super::vm::VmShared;

/// Why an access did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The page is not mapped with the needed permission: a retry fault.
    Fault {
        /// The page.
        page: GpuVa,
        /// The access that needs it.
        access: AccessFlags,
    },
    /// The translation names memory that is not guest RAM any more.
    Error(GpuVa),
}

fn from_outcome(o: StepOutcome) -> Stop {
    match o {
        StepOutcome::Fault { page, access } => Stop::Fault { page, access },
        StepOutcome::Error(_, va) => Stop::Error(va),
        // `translate` never returns `Done` as an error.
        StepOutcome::Done => Stop::Error(GpuVa(0)),
    }
}

/// Runs `f` as one step: the VM's page tables read-locked, its current
/// translation generation, guest RAM, and the engine's TLB.
pub(crate) fn step<R>(vm: &VmShared, tlb: &mut Tlb, f: impl FnOnce(&mut Mmu<'_>) -> R) -> R {
    let pt = vm.pt.read();
    let generation = vm.generation.load(Ordering::Acquire);
    let mem = vm.memory.memory();
    let mut mmu = Mmu {
        vm: vm.id,
        generation,
        pt: &pt,
        tlb,
        mem: &mem,
    };
    f(&mut mmu)
}

fn translate(mmu: &mut Mmu<'_>, va: u64, access: AccessFlags) -> Result<GuestAddress, Stop> {
    mmu.translate(va, access).map_err(from_outcome)
}

/// Loads the naturally aligned `u32` at `va` (acquire).
pub(crate) fn load_u32(mmu: &mut Mmu<'_>, va: GpuVa) -> Result<u32, Stop> {
    let at = translate(mmu, va.raw(), AccessFlags::READ)?;
    mmu.mem
        .load(at, Ordering::Acquire)
        .map_err(|_| Stop::Error(va))
}

/// Loads the naturally aligned `u64` at `va` (acquire).
pub(crate) fn load_u64(mmu: &mut Mmu<'_>, va: GpuVa) -> Result<u64, Stop> {
    let at = translate(mmu, va.raw(), AccessFlags::READ)?;
    mmu.mem
        .load(at, Ordering::Acquire)
        .map_err(|_| Stop::Error(va))
}

/// Stores the naturally aligned `u16` at `va` (release).
pub(crate) fn store_u16(mmu: &mut Mmu<'_>, va: GpuVa, v: u16) -> Result<(), Stop> {
    let at = translate(mmu, va.raw(), AccessFlags::WRITE)?;
    mmu.mem
        .store(v, at, Ordering::Release)
        .map_err(|_| Stop::Error(va))
}

/// Stores the naturally aligned `u32` at `va` (release).
pub(crate) fn store_u32(mmu: &mut Mmu<'_>, va: GpuVa, v: u32) -> Result<(), Stop> {
    let at = translate(mmu, va.raw(), AccessFlags::WRITE)?;
    mmu.mem
        .store(v, at, Ordering::Release)
        .map_err(|_| Stop::Error(va))
}

/// Stores the naturally aligned `u64` at `va` (release).
pub(crate) fn store_u64(mmu: &mut Mmu<'_>, va: GpuVa, v: u64) -> Result<(), Stop> {
    let at = translate(mmu, va.raw(), AccessFlags::WRITE)?;
    mmu.mem
        .store(v, at, Ordering::Release)
        .map_err(|_| Stop::Error(va))
}

/// Atomically replaces the naturally aligned `u64` (or, without `wide`,
/// `u32`) at `va` by `f(old)`; returns the old value.
pub(crate) fn atomic_update(
    mmu: &mut Mmu<'_>,
    va: GpuVa,
    wide: bool,
    f: impl Fn(u64) -> u64,
) -> Result<u64, Stop> {
    let at = translate(mmu, va.raw(), AccessFlags::ATOMIC)?;
    let len = if wide { 8 } else { 4 };
    let slice = mmu.mem.get_slice(at, len).map_err(|_| Stop::Error(va))?;
    if wide {
        let a = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|_| Stop::Error(va))?;
        a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| Some(f(old)))
            .map_err(|_| Stop::Error(va))
    } else {
        let a = slice
            .get_atomic_ref::<AtomicU32>(0)
            .map_err(|_| Stop::Error(va))?;
        a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
            Some(f(u64::from(old)) as u32)
        })
        .map(u64::from)
        .map_err(|_| Stop::Error(va))
    }
}

/// Reads `buf.len()` bytes from `va` (any alignment, across pages).
pub(crate) fn read(mmu: &mut Mmu<'_>, va: GpuVa, buf: &mut [u8]) -> Result<(), Stop> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = va.raw().wrapping_add(done as u64);
        let left_in_page = (PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize;
        let n = left_in_page.min(buf.len() - done);
        let gpa = translate(mmu, at, AccessFlags::READ)?;
        let chunk = buf.get_mut(done..done + n).ok_or(Stop::Error(GpuVa(at)))?;
        mmu.mem
            .read_slice(chunk, gpa)
            .map_err(|_| Stop::Error(GpuVa(at)))?;
        done += n;
    }
    Ok(())
}

/// The most bytes one copy or fill step moves: bounds how long a step
/// holds the page-table lock (and so how long an unmap can wait: about
/// 60 us at memcpy speed). Large enough that the host's memmove takes its
/// streaming path: measured, 64 KiB steps reach ~60% of a 64 MiB memcpy,
/// 1 MiB steps ~90-100% (`benches/user_queues.rs`).
pub(crate) const MAX_STEP_BYTES: u64 = 1 << 20;

/// Copies up to `len` bytes (at most [`MAX_STEP_BYTES`]) from `src` to
/// `dst` in ascending address order, as one step. Returns how many bytes
/// were copied and, if it stopped early, why: the pages before the first
/// one that failed to translate are copied, nothing after it.
pub(crate) fn copy(mmu: &mut Mmu<'_>, dst: u64, src: u64, len: u64) -> (u64, Option<Stop>) {
    let len = len.min(MAX_STEP_BYTES);
    // Translate first, then copy: physically contiguous runs of both sides
    // become one memmove each.
    let mut runs: [(GuestAddress, GuestAddress, u64); 32] =
        [(GuestAddress(0), GuestAddress(0), 0); 32];
    let mut nruns = 0usize;
    let mut planned = 0u64;
    let mut stop = None;
    while planned < len {
        let s = src.wrapping_add(planned);
        let d = dst.wrapping_add(planned);
        let n = (PAGE_SIZE - (s & (PAGE_SIZE - 1)))
            .min(PAGE_SIZE - (d & (PAGE_SIZE - 1)))
            .min(len - planned);
        let from = match translate(mmu, s, AccessFlags::READ) {
            Ok(a) => a,
            Err(e) => {
                stop = Some(e);
                break;
            }
        };
        let to = match translate(mmu, d, AccessFlags::WRITE) {
            Ok(a) => a,
            Err(e) => {
                stop = Some(e);
                break;
            }
        };
        let merged = nruns > 0
            && runs.get(nruns - 1).is_some_and(|(f, t, l)| {
                f.0.wrapping_add(*l) == from.0 && t.0.wrapping_add(*l) == to.0
            });
        if merged {
            if let Some(r) = runs.get_mut(nruns - 1) {
                r.2 += n;
            }
        } else if let Some(r) = runs.get_mut(nruns) {
            *r = (from, to, n);
            nruns += 1;
        } else {
            // Out of run slots: copy what is planned, continue next step.
            break;
        }
        planned += n;
    }
    let mut copied = 0u64;
    for (from, to, n) in runs.iter().take(nruns) {
        let at = src.wrapping_add(copied);
        let slices = mmu
            .mem
            .get_slice(*from, *n as usize)
            .and_then(|s| mmu.mem.get_slice(*to, *n as usize).map(|d| (s, d)));
        match slices {
            Ok((s, d)) => s.copy_to_volatile_slice(d),
            Err(_) => return (copied, Some(Stop::Error(GpuVa(at)))),
        }
        copied += n;
    }
    (copied, stop)
}

/// Fills up to `len` bytes (at most [`MAX_STEP_BYTES`]) from `dst` with
/// `pattern` repeated (its length divides the page size and `dst` is
/// aligned to it), as one step. Returns bytes written and why it stopped
/// early.
pub(crate) fn fill(mmu: &mut Mmu<'_>, dst: u64, pattern: &[u8], len: u64) -> (u64, Option<Stop>) {
    let len = len.min(MAX_STEP_BYTES);
    let mut page = [0u8; PAGE_SIZE as usize];
    if !pattern.is_empty() {
        for chunk in page.chunks_mut(pattern.len()) {
            let n = chunk.len();
            chunk.copy_from_slice(pattern.get(..n).unwrap_or_default());
        }
    }
    let mut done = 0u64;
    while done < len {
        let d = dst.wrapping_add(done);
        let off = (d & (PAGE_SIZE - 1)) as usize;
        let n = (PAGE_SIZE - off as u64).min(len - done);
        let to = match translate(mmu, d, AccessFlags::WRITE) {
            Ok(a) => a,
            Err(e) => return (done, Some(e)),
        };
        // `page` repeats the pattern from offset 0 and `dst` is aligned to
        // the pattern, so the bytes at `off` continue it.
        let bytes = page.get(off..off + n as usize).unwrap_or_default();
        if mmu.mem.write_slice(bytes, to).is_err() {
            return (done, Some(Stop::Error(GpuVa(d))));
        }
        done += n;
    }
    (done, None)
}
