//! The kernel set (docs/protocol.md section 10), executed wave by wave.
//!
//! A wave owns a range of a dispatch's work items and remembers how far it
//! got, so a replay after a fault continues exactly where the wave stalled.
//! Every step first translates *all* the addresses it will touch and only
//! then has an effect: a step that faults has changed nothing, so the final
//! memory contents are those of a fault-free run (an atomic add is never
//! applied twice).
//!
//! A step covers at most one page of each array (`COPY`: up to 1 MiB, see
//! `copy`), under one hold of the VM's page-table read lock (see `vm.rs`
//! for why that makes unmap safe).

use std::sync::atomic::{AtomicU64, Ordering};

use guest_proto::{AccessFlags, DispatchStatus, GpuVa, Kernel, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

use super::gpu_access::{self, Stop};
use super::page_table::PageTable;
use super::tlb::Tlb;

/// How a step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// The step (or the wave, if its progress says finished) completed.
    Done,
    /// An address could not be translated for this access.
    Fault {
        /// The page.
        page: GpuVa,
        /// The access that needs it.
        access: AccessFlags,
    },
    /// The dispatch fails (memory error).
    Error(DispatchStatus, GpuVa),
}

/// Translation for one step: the wave's CU TLB and the VM's page tables.
#[allow(missing_debug_implementations)]
pub struct Mmu<'a> {
    /// VM tag for the TLB.
    pub vm: u64,
    /// The VM's translation generation now.
    pub generation: u64,
    /// The page tables (read-locked for the step).
    pub pt: &'a PageTable,
    /// The compute unit's TLB.
    pub tlb: &'a mut Tlb,
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap,
}

impl Mmu<'_> {
    /// The guest-physical address of `va` for `access`.
    #[inline]
    pub fn translate(&mut self, va: u64, access: AccessFlags) -> Result<GuestAddress, StepOutcome> {
        let page = GpuVa(va & !(PAGE_SIZE - 1));
        let pte = match self.tlb.lookup(self.vm, self.generation, page) {
            Some(p) => p,
            None => {
                let p = self.pt.walk(page);
                if p.is_valid() {
                    self.tlb.insert(self.vm, self.generation, page, p);
                }
                p
            }
        };
        if pte.allows(access) {
            Ok(GuestAddress(pte.frame().raw() + (va & (PAGE_SIZE - 1))))
        } else {
            Err(StepOutcome::Fault { page, access })
        }
    }
}

/// Bytes left in the page of `va`.
#[inline]
fn page_left(va: u64) -> u64 {
    PAGE_SIZE - (va & (PAGE_SIZE - 1))
}

fn mem_error(va: u64) -> StepOutcome {
    StepOutcome::Error(DispatchStatus::DeviceError, GpuVa(va))
}

/// Where a wave is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaveProgress {
    /// Next work item.
    pub next: u64,
    /// End of the wave's range.
    pub end: u64,
    /// `POINTER_CHASE` state: current node, steps taken, sum so far.
    chase: (u64, u64, u64),
}

impl WaveProgress {
    /// A wave over items `[start, end)` of `kernel`.
    pub fn new(kernel: &Kernel, start: u64, end: u64) -> WaveProgress {
        let chase = match kernel {
            Kernel::PointerChase { head, .. } => (head.raw(), 0, 0),
            _ => (0, 0, 0),
        };
        WaveProgress {
            next: start,
            end,
            chase,
        }
    }

    /// Whether every item of the range is done.
    pub fn finished(&self) -> bool {
        self.next >= self.end
    }
}

/// Work items of a kernel and how many one wave takes.
pub fn work_items(kernel: &Kernel) -> (u64, u64) {
    match *kernel {
        Kernel::Fill { count, .. } => (count, 16 * 1024),
        // One step each: see `copy`.
        Kernel::Copy { size, .. } => (size, gpu_access::MAX_STEP_BYTES),
        // Items of an atomic add are aggregated per counter: a wave is the
        // set of counters it updates.
        Kernel::AtomicAdd { num_counters, .. } => (u64::from(num_counters), 512),
        Kernel::Saxpy { count, .. } => (count, 16 * 1024),
        Kernel::Gather { count, .. } => (count, 4 * 1024),
        Kernel::PointerChase { .. } => (1, 1),
    }
}

/// Runs one step of a wave.
pub fn step(kernel: &Kernel, p: &mut WaveProgress, mmu: &mut Mmu<'_>) -> StepOutcome {
    if p.finished() {
        return StepOutcome::Done;
    }
    let r = match *kernel {
        Kernel::Fill { dst, value, .. } => fill(dst.raw(), value, p, mmu),
        Kernel::Copy { dst, src, .. } => copy(dst.raw(), src.raw(), p, mmu),
        Kernel::AtomicAdd {
            counters,
            num_counters,
            items,
            addend,
        } => atomic_add(counters.raw(), num_counters, items, addend, p, mmu),
        Kernel::Saxpy { x, y, a, .. } => saxpy(x.raw(), y.raw(), a, p, mmu),
        Kernel::Gather {
            dst, src, indices, ..
        } => gather(dst.raw(), src.raw(), indices.raw(), p, mmu),
        Kernel::PointerChase {
            max_steps, result, ..
        } => chase(max_steps, result.raw(), p, mmu),
    };
    match r {
        Ok(()) => StepOutcome::Done,
        Err(o) => o,
    }
}

fn fill(dst: u64, value: u32, p: &mut WaveProgress, mmu: &mut Mmu<'_>) -> Result<(), StepOutcome> {
    let va = dst.wrapping_add(p.next * 4);
    let n = (page_left(va) / 4).min(p.end - p.next);
    let addr = mmu.translate(va, AccessFlags::WRITE)?;
    let mut buf = [0u8; PAGE_SIZE as usize];
    for chunk in buf.chunks_exact_mut(4).take(n as usize) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    mmu.mem
        .write_slice(&buf[..(n * 4) as usize], addr)
        .map_err(|_| mem_error(va))?;
    p.next += n;
    Ok(())
}

/// A `COPY` step moves up to [`gpu_access::MAX_STEP_BYTES`] (1 MiB) of the
/// wave's range: every page is translated first, physically contiguous
/// runs become one memmove each (the host's streaming copy, not 4 KiB
/// pieces), and only the pages before the first one that does not
/// translate are copied. A step that copies nothing and faults has had no
/// effect; one that copied some pages ends there and the next step faults
/// on the page, changing nothing either.
fn copy(dst: u64, src: u64, p: &mut WaveProgress, mmu: &mut Mmu<'_>) -> Result<(), StepOutcome> {
    let s = src.wrapping_add(p.next);
    let d = dst.wrapping_add(p.next);
    let (n, stop) = gpu_access::copy(mmu, d, s, p.end - p.next);
    p.next += n;
    match stop {
        None => Ok(()),
        Some(_) if n > 0 => Ok(()),
        Some(Stop::Fault { page, access }) => Err(StepOutcome::Fault { page, access }),
        Some(Stop::Error(va)) => Err(mem_error(va.raw())),
    }
}

fn atomic_add(
    counters: u64,
    num_counters: u32,
    items: u64,
    addend: u64,
    p: &mut WaveProgress,
    mmu: &mut Mmu<'_>,
) -> Result<(), StepOutcome> {
    // Counter j receives every item i < items with i % n == j.
    let n = u64::from(num_counters);
    let j = p.next;
    let hits = if j < items {
        (items - j).div_ceil(n)
    } else {
        0
    };
    if hits > 0 {
        let va = counters.wrapping_add(j * 8);
        let addr = mmu.translate(va, AccessFlags::ATOMIC)?;
        let slice = mmu.mem.get_slice(addr, 8).map_err(|_| mem_error(va))?;
        let counter = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|_| mem_error(va))?;
        counter.fetch_add(addend.wrapping_mul(hits), Ordering::AcqRel);
    }
    p.next += 1;
    Ok(())
}

fn saxpy(
    x: u64,
    y: u64,
    a: f32,
    p: &mut WaveProgress,
    mmu: &mut Mmu<'_>,
) -> Result<(), StepOutcome> {
    let xv = x.wrapping_add(p.next * 4);
    let yv = y.wrapping_add(p.next * 4);
    let n = (page_left(xv).min(page_left(yv)) / 4).min(p.end - p.next) as usize;
    let xa = mmu.translate(xv, AccessFlags::READ)?;
    let ya = mmu.translate(yv, AccessFlags::READ.union(AccessFlags::WRITE))?;
    let mut xb = [0u8; PAGE_SIZE as usize];
    let mut yb = [0u8; PAGE_SIZE as usize];
    let (xs, ys) = (&mut xb[..n * 4], &mut yb[..n * 4]);
    mmu.mem.read_slice(xs, xa).map_err(|_| mem_error(xv))?;
    mmu.mem.read_slice(ys, ya).map_err(|_| mem_error(yv))?;
    for (xc, yc) in xs.chunks_exact(4).zip(ys.chunks_exact_mut(4)) {
        let xf = f32::from_le_bytes([xc[0], xc[1], xc[2], xc[3]]);
        let yf = f32::from_le_bytes([yc[0], yc[1], yc[2], yc[3]]);
        yc.copy_from_slice(&a.mul_add(xf, yf).to_le_bytes());
    }
    mmu.mem.write_slice(ys, ya).map_err(|_| mem_error(yv))?;
    p.next += n as u64;
    Ok(())
}

fn gather(
    dst: u64,
    src: u64,
    indices: u64,
    p: &mut WaveProgress,
    mmu: &mut Mmu<'_>,
) -> Result<(), StepOutcome> {
    // Up to a page of output per step, one item at a time.
    let first = p.next;
    let d0 = dst.wrapping_add(first * 4);
    let n = (page_left(d0) / 4).min(p.end - first).min(256);
    for i in first..first + n {
        let iv = indices.wrapping_add(i * 4);
        let ia = mmu.translate(iv, AccessFlags::READ)?;
        let index: u32 = mmu.mem.read_obj(ia).map_err(|_| mem_error(iv))?;
        let sv = src.wrapping_add(u64::from(index) * 4);
        let sa = mmu.translate(sv, AccessFlags::READ)?;
        let dv = dst.wrapping_add(i * 4);
        let da = mmu.translate(dv, AccessFlags::WRITE)?;
        let value: u32 = mmu.mem.read_obj(sa).map_err(|_| mem_error(sv))?;
        mmu.mem.write_obj(value, da).map_err(|_| mem_error(dv))?;
        p.next = i + 1;
    }
    Ok(())
}

fn chase(
    max_steps: u64,
    result: u64,
    p: &mut WaveProgress,
    mmu: &mut Mmu<'_>,
) -> Result<(), StepOutcome> {
    for _ in 0..256 {
        let (node, steps, sum) = p.chase;
        if node == 0 || steps >= max_steps {
            let sum_at = mmu.translate(result, AccessFlags::WRITE)?;
            let steps_va = result.wrapping_add(8);
            let steps_at = mmu.translate(steps_va, AccessFlags::WRITE)?;
            mmu.mem
                .write_obj(sum, sum_at)
                .map_err(|_| mem_error(result))?;
            mmu.mem
                .write_obj(steps, steps_at)
                .map_err(|_| mem_error(steps_va))?;
            p.next = p.end;
            return Ok(());
        }
        let next_at = mmu.translate(node, AccessFlags::READ)?;
        let value_va = node.wrapping_add(8);
        let value_at = mmu.translate(value_va, AccessFlags::READ)?;
        let next: u64 = mmu.mem.read_obj(next_at).map_err(|_| mem_error(node))?;
        let value: u64 = mmu
            .mem
            .read_obj(value_at)
            .map_err(|_| mem_error(value_va))?;
        p.chase = (next, steps + 1, sum.wrapping_add(value));
    }
    Ok(())
}
