//! The 42 `hsaKmt*` functions ROCr 5.2.3 imports, plus one debug hook
//! (`vgncKmtQueryCounters`, version `VGNC_DEBUG_1`). Each checks its
//! pointers, takes the thunk, and runs under `catch_unwind` so that no
//! panic crosses into C.
//!
//! # Safety
//!
//! Every export has the contract of its declaration in Debian's
//! `hsakmt.h`: a non-NULL pointer argument points to memory of the type
//! (or the array of the length) it names, valid for the call; NULL is
//! refused where the C API allows it to be passed. That one contract is
//! why the functions carry no `# Safety` section each.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use core::ffi::c_void;

use crate::events::EventError;
use crate::thunk::Thunk;
use crate::topology::{CPU_NODE, GPU_NODE, NUM_NODES};
use crate::types::*;

struct Open {
    thunk: Option<Arc<Thunk>>,
    count: u32,
    pid: u32,
    xnack: i32,
}

static OPEN: Mutex<Open> = Mutex::new(Open {
    thunk: None,
    count: 0,
    pid: 0,
    xnack: 1,
});

fn open_state() -> std::sync::MutexGuard<'static, Open> {
    OPEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` with no panic escaping.
fn guard(f: impl FnOnce() -> HsakmtStatus) -> HsakmtStatus {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(HSAKMT_STATUS_ERROR)
}

/// The open thunk, as `CHECK_KFD_OPEN` checks it: not open, or opened by
/// the parent of this forked process, is `KERNEL_IO_CHANNEL_NOT_OPENED`.
fn thunk() -> Result<Arc<Thunk>, HsakmtStatus> {
    let o = open_state();
    match &o.thunk {
        Some(t) if o.pid == std::process::id() => Ok(t.clone()),
        _ => Err(HSAKMT_STATUS_KERNEL_IO_CHANNEL_NOT_OPENED),
    }
}

fn run(f: impl FnOnce(&Thunk) -> Result<(), HsakmtStatus>) -> HsakmtStatus {
    guard(|| match thunk().and_then(|t| f(&t)) {
        Ok(()) => HSAKMT_STATUS_SUCCESS,
        Err(s) => s,
    })
}

/// `*p = v` for an out-pointer, refusing NULL.
///
/// # Safety
///
/// A non-NULL `p` points to writable memory for one `T` (it may be
/// unaligned).
unsafe fn put<T>(p: *mut T, v: T) -> Result<(), HsakmtStatus> {
    if p.is_null() {
        return Err(HSAKMT_STATUS_INVALID_PARAMETER);
    }
    // SAFETY: the caller passes a pointer to a writable `T` (the C API's
    // contract); NULL was refused. `write_unaligned`: packed C structs.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// Copies `items` into the caller's array of `n`.
///
/// # Safety
///
/// A non-NULL `p` points to writable memory for `n` values of `T`.
unsafe fn put_array<T: Copy>(p: *mut T, n: u32, items: &[T]) -> Result<(), HsakmtStatus> {
    if n == 0 {
        return Ok(());
    }
    if p.is_null() {
        return Err(HSAKMT_STATUS_INVALID_PARAMETER);
    }
    for (i, item) in items.iter().take(n as usize).enumerate() {
        // SAFETY: the caller's array has `n` elements (the C API sizes it
        // from the node's counts); `i < n`.
        unsafe { p.add(i).write_unaligned(*item) };
    }
    Ok(())
}

fn node_index(node: u32) -> Result<usize, HsakmtStatus> {
    if node < NUM_NODES {
        Ok(node as usize)
    } else {
        Err(HSAKMT_STATUS_INVALID_NODE_UNIT)
    }
}

// --- open / close / version / topology ---------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtOpenKFD() -> HsakmtStatus {
    guard(|| {
        let mut o = open_state();
        let pid = std::process::id();
        if o.thunk.is_some() && o.pid == pid {
            o.count += 1;
            return HSAKMT_STATUS_KERNEL_ALREADY_OPENED;
        }
        // A forked child starts over with its own session.
        o.thunk = None;
        match Thunk::open() {
            Ok(t) => {
                o.thunk = Some(t);
                o.count = 1;
                o.pid = pid;
                o.xnack = 1;
                HSAKMT_STATUS_SUCCESS
            }
            Err(s) => s,
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtCloseKFD() -> HsakmtStatus {
    guard(|| {
        let closing = {
            let mut o = open_state();
            if o.thunk.is_none() || o.pid != std::process::id() {
                return HSAKMT_STATUS_KERNEL_IO_CHANNEL_NOT_OPENED;
            }
            o.count -= 1;
            if o.count > 0 {
                return HSAKMT_STATUS_SUCCESS;
            }
            o.thunk.take()
        };
        if let Some(t) = closing {
            t.close();
        }
        HSAKMT_STATUS_SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtGetVersion(v: *mut HsaVersionInfo) -> HsakmtStatus {
    run(|_| {
        // SAFETY: out-pointer from the caller.
        unsafe {
            put(
                v,
                HsaVersionInfo {
                    KernelInterfaceMajorVersion: 1,
                    KernelInterfaceMinorVersion: 8,
                },
            )
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtAcquireSystemProperties(
    p: *mut HsaSystemProperties,
) -> HsakmtStatus {
    run(|_| {
        // SAFETY: out-pointer from the caller.
        unsafe {
            put(
                p,
                HsaSystemProperties {
                    NumNodes: NUM_NODES,
                    PlatformOem: 0,
                    PlatformId: 0,
                    PlatformRev: 0,
                },
            )
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtReleaseSystemProperties() -> HsakmtStatus {
    run(|_| Ok(()))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtGetNodeProperties(
    node: u32,
    p: *mut HsaNodeProperties,
) -> HsakmtStatus {
    run(|t| {
        let i = node_index(node)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(p, t.topology.nodes[i]) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtGetNodeMemoryProperties(
    node: u32,
    n: u32,
    p: *mut HsaMemoryProperties,
) -> HsakmtStatus {
    run(|t| {
        let i = node_index(node)?;
        // SAFETY: the caller's array of `n`.
        unsafe { put_array(p, n, &t.topology.banks[i]) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtGetNodeCacheProperties(
    node: u32,
    _processor: u32,
    n: u32,
    p: *mut HsaCacheProperties,
) -> HsakmtStatus {
    run(|t| {
        let i = node_index(node)?;
        // SAFETY: the caller's array of `n`.
        unsafe { put_array(p, n, &t.topology.caches[i]) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtGetNodeIoLinkProperties(
    node: u32,
    n: u32,
    p: *mut HsaIoLinkProperties,
) -> HsakmtStatus {
    run(|t| {
        let i = node_index(node)?;
        // SAFETY: the caller's array of `n`.
        unsafe { put_array(p, n, &t.topology.links[i]) }
    })
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtGetClockCounters(
    node: u32,
    c: *mut HsaClockCounters,
) -> HsakmtStatus {
    run(|_| {
        node_index(node)?;
        let system = clock_ns(libc::CLOCK_BOOTTIME);
        // SAFETY: out-pointer from the caller.
        unsafe {
            put(
                c,
                HsaClockCounters {
                    // The device's timestamps are nanoseconds too.
                    GPUClockCounter: system,
                    CPUClockCounter: clock_ns(libc::CLOCK_MONOTONIC_RAW),
                    SystemClockCounter: system,
                    SystemClockFrequencyHz: 1_000_000_000,
                },
            )
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtGetTileConfig(
    node: u32,
    cfg: *mut HsaGpuTileConfig,
) -> HsakmtStatus {
    run(|_| {
        if node != GPU_NODE {
            return Err(HSAKMT_STATUS_INVALID_NODE_UNIT);
        }
        if cfg.is_null() {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        // SAFETY: a valid, non-NULL config from the caller. gfx9 has no
        // tile mode tables: zero entries, as KFD reports for it.
        unsafe {
            let mut c = cfg.read_unaligned();
            c.NumTileConfigs = 0;
            c.NumMacroTileConfigs = 0;
            c.GbAddrConfig = 0;
            c.NumBanks = 0;
            c.NumRanks = 0;
            cfg.write_unaligned(c);
        }
        Ok(())
    })
}

// --- runtime / debugger / XNACK ------------------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtRuntimeEnable(_r_debug: *mut c_void, _setup_ttmp: bool) -> HsakmtStatus {
    // No debugger interface: what the real thunk returns when KFD lacks
    // AMDKFD_IOC_RUNTIME_ENABLE (ROCr then uses its non-debug trap path).
    run(|_| Err(HSAKMT_STATUS_NOT_SUPPORTED))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtRuntimeDisable() -> HsakmtStatus {
    run(|_| Err(HSAKMT_STATUS_NOT_SUPPORTED))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtSetTrapHandler(
    node: u32,
    _base: *mut c_void,
    _size: u64,
    _buffer: *mut c_void,
    _buffer_size: u64,
) -> HsakmtStatus {
    // Recorded by nobody: the device runs no shader code, so no trap.
    run(|_| {
        if node == GPU_NODE {
            Ok(())
        } else {
            Err(HSAKMT_STATUS_INVALID_NODE_UNIT)
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtGetXNACKMode(enable: *mut i32) -> HsakmtStatus {
    run(|_| {
        let mode = open_state().xnack;
        // SAFETY: out-pointer from the caller.
        unsafe { put(enable, mode) }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtSetXNACKMode(enable: i32) -> HsakmtStatus {
    run(|t| {
        let on = enable != 0;
        crate::thunk::set_xnack(t, on)?;
        open_state().xnack = i32::from(on);
        Ok(())
    })
}

// --- memory --------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtAllocMemory(
    node: u32,
    size: u64,
    flags: HsaMemFlags,
    addr: *mut *mut c_void,
) -> HsakmtStatus {
    run(|t| {
        if addr.is_null() {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        let a = t.alloc_memory(node, size, flags)?;
        crate::debug(|| {
            format!(
                "AllocMemory node={node} size={size:#x} flags={:#x} -> {a:#x}",
                flags.Value
            )
        });
        // SAFETY: checked non-NULL out-pointer.
        unsafe { put(addr, a as *mut c_void) }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtFreeMemory(addr: *mut c_void, _size: u64) -> HsakmtStatus {
    run(|t| t.release(addr as u64, false))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtMapMemoryToGPU(
    addr: *mut c_void,
    _size: u64,
    alt: *mut u64,
) -> HsakmtStatus {
    run(|t| {
        let va = t.map(addr as u64, false)?;
        if !alt.is_null() {
            // SAFETY: non-NULL out-pointer from the caller.
            unsafe { put(alt, va)? };
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtMapMemoryToGPUNodes(
    addr: *mut c_void,
    _size: u64,
    alt: *mut u64,
    flags: HsaMemMapFlags,
    n: u64,
    nodes: *mut u32,
) -> HsakmtStatus {
    run(|t| {
        if n == 0 || nodes.is_null() || n > u64::from(NUM_NODES) {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        // SAFETY: the caller's array of `n` node ids (n <= 2 checked).
        let list = unsafe { std::slice::from_raw_parts(nodes, n as usize) };
        if list.iter().any(|&x| x != GPU_NODE) {
            return Err(HSAKMT_STATUS_INVALID_NODE_UNIT);
        }
        let va = t.map(addr as u64, flags.Value & map_flags::READ_ONLY != 0)?;
        if !alt.is_null() {
            // SAFETY: non-NULL out-pointer from the caller.
            unsafe { put(alt, va)? };
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtUnmapMemoryToGPU(addr: *mut c_void) -> HsakmtStatus {
    run(|t| t.unmap(addr as u64))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtRegisterMemoryWithFlags(
    addr: *mut c_void,
    size: u64,
    flags: HsaMemFlags,
) -> HsakmtStatus {
    run(|t| t.register(addr as u64, size, flags))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtDeregisterMemory(addr: *mut c_void) -> HsakmtStatus {
    run(|t| t.release(addr as u64, true))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtQueryPointerInfo(
    ptr: *const c_void,
    info: *mut HsaPointerInfo,
) -> HsakmtStatus {
    run(|t| {
        let i = t.pointer_info(ptr as u64);
        // SAFETY: out-pointer from the caller.
        unsafe { put(info, i)? };
        if i.Type == HSA_POINTER_UNKNOWN {
            Err(HSAKMT_STATUS_ERROR)
        } else {
            Ok(())
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtSetMemoryUserData(ptr: *const c_void, data: *mut c_void) -> HsakmtStatus {
    run(|t| t.set_user_data(ptr as u64, data as usize))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtSetMemoryPolicy(
    node: u32,
    _default: u32,
    _alternate: u32,
    _addr: *mut c_void,
    _size: u64,
) -> HsakmtStatus {
    // The real thunk: a Kaveri-only legacy API, NOT_IMPLEMENTED elsewhere.
    run(|_| {
        node_index(node)?;
        Err(HSAKMT_STATUS_NOT_IMPLEMENTED)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtSVMSetAttr(
    start: *mut c_void,
    size: u64,
    n: u32,
    attrs: *mut HSA_SVM_ATTRIBUTE,
) -> HsakmtStatus {
    run(|t| {
        if n == 0 || attrs.is_null() || n > 64 {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        // SAFETY: the caller's array of `n` attributes (bounded above).
        let list = unsafe { std::slice::from_raw_parts(attrs, n as usize) };
        t.svm_set(start as u64, size, list)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtSVMGetAttr(
    start: *mut c_void,
    size: u64,
    n: u32,
    attrs: *mut HSA_SVM_ATTRIBUTE,
) -> HsakmtStatus {
    run(|t| {
        if n == 0 || attrs.is_null() || n > 64 {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        // SAFETY: the caller's array of `n` attributes, in and out.
        let list = unsafe { std::slice::from_raw_parts_mut(attrs, n as usize) };
        t.svm_get(start as u64, size, list)
    })
}

// --- IPC and graphics interop: not offered -------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtShareMemory(
    _addr: *mut c_void,
    _size: u64,
    _handle: *mut HsaSharedMemoryHandle,
) -> HsakmtStatus {
    run(|_| Err(HSAKMT_STATUS_NOT_SUPPORTED))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtRegisterSharedHandle(
    _handle: *const HsaSharedMemoryHandle,
    _addr: *mut *mut c_void,
    _size: *mut u64,
) -> HsakmtStatus {
    run(|_| Err(HSAKMT_STATUS_NOT_SUPPORTED))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtRegisterSharedHandleToNodes(
    _handle: *const HsaSharedMemoryHandle,
    _addr: *mut *mut c_void,
    _size: *mut u64,
    _n: u64,
    _nodes: *mut u32,
) -> HsakmtStatus {
    run(|_| Err(HSAKMT_STATUS_NOT_SUPPORTED))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtRegisterGraphicsHandleToNodes(
    _handle: u64,
    _info: *mut HsaGraphicsResourceInfo,
    _n: u64,
    _nodes: *mut u32,
) -> HsakmtStatus {
    run(|_| Err(HSAKMT_STATUS_NOT_SUPPORTED))
}

// --- events --------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtCreateEvent(
    desc: *mut HsaEventDescriptor,
    manual_reset: bool,
    signaled: bool,
    event: *mut *mut HsaEvent,
) -> HsakmtStatus {
    run(|t| {
        if desc.is_null() || event.is_null() {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        // SAFETY: a valid descriptor from the caller (non-NULL checked).
        let d = unsafe { desc.read_unaligned() };
        let h = t
            .events
            .lock()
            .create(&d, manual_reset, signaled, t.event_page.map.addr())
            .map_err(EventError::status)?;
        // SAFETY: checked non-NULL out-pointer.
        unsafe { put(event, h) }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtDestroyEvent(event: *mut HsaEvent) -> HsakmtStatus {
    run(|t| {
        t.events.lock().destroy(event).map_err(EventError::status)?;
        t.events.notify();
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtSetEvent(event: *mut HsaEvent) -> HsakmtStatus {
    run(|t| {
        t.events.lock().set(event, true).map_err(|e| {
            if e == EventError::Invalid {
                HSAKMT_STATUS_ERROR
            } else {
                e.status()
            }
        })?;
        t.events.notify();
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtWaitOnEvent(event: *mut HsaEvent, ms: u32) -> HsakmtStatus {
    if event.is_null() {
        return HSAKMT_STATUS_INVALID_HANDLE;
    }
    let mut one = event;
    // SAFETY: a one-element array on our stack.
    unsafe { hsaKmtWaitOnMultipleEvents(&mut one, 1, true, ms) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtWaitOnMultipleEvents(
    events: *mut *mut HsaEvent,
    n: u32,
    all: bool,
    ms: u32,
) -> HsakmtStatus {
    run(|t| {
        if events.is_null() {
            return Err(HSAKMT_STATUS_INVALID_HANDLE);
        }
        if n == 0 || n > crate::events::EVENT_SLOTS {
            return Err(HSAKMT_STATUS_ERROR);
        }
        // SAFETY: the caller's array of `n` event pointers (bounded).
        let list = unsafe { std::slice::from_raw_parts(events, n as usize) };
        let handles: Vec<*const HsaEvent> = list.iter().map(|p| *p as *const HsaEvent).collect();
        t.events
            .wait(&handles, all, ms, || t.kick())
            .map_err(|e| match e {
                EventError::BadHandle => HSAKMT_STATUS_INVALID_HANDLE,
                EventError::Timeout => HSAKMT_STATUS_WAIT_TIMEOUT,
                _ => HSAKMT_STATUS_WAIT_FAILURE,
            })
    })
}

// --- queues --------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hsaKmtCreateQueue(
    node: u32,
    ty: HSA_QUEUE_TYPE,
    _percentage: u32,
    priority: HSA_QUEUE_PRIORITY,
    ring: *mut c_void,
    ring_size: u64,
    _event: *mut HsaEvent,
    res: *mut HsaQueueResource,
) -> HsakmtStatus {
    run(|t| {
        if res.is_null() {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        // SAFETY: non-NULL in/out pointer from the caller.
        let mut r = unsafe { res.read_unaligned() };
        crate::queues::create(t, node, ty, priority, ring as u64, ring_size, &mut r)?;
        crate::debug(|| {
            format!(
                "CreateQueue type={ty} ring={:#x} size={ring_size:#x} -> {}",
                ring as u64,
                { r.QueueId }
            )
        });
        // SAFETY: as above.
        unsafe { put(res, r) }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtDestroyQueue(queue: u64) -> HsakmtStatus {
    run(|t| crate::queues::destroy(t, queue))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtUpdateQueue(
    queue: u64,
    _percentage: u32,
    _priority: HSA_QUEUE_PRIORITY,
    _ring: *mut c_void,
    _size: u64,
    _event: *mut HsaEvent,
) -> HsakmtStatus {
    run(|t| crate::queues::update(t, queue))
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtSetQueueCUMask(queue: u64, count: u32, mask: *mut u32) -> HsakmtStatus {
    run(|t| {
        if count == 0 || mask.is_null() || !count.is_multiple_of(32) {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        // Every CU serves every queue on this device; the mask is kept by
        // nobody, as on a GPU whose firmware ignores it.
        crate::queues::update(t, queue)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn hsaKmtAllocQueueGWS(_queue: u64, _n: u32, _first: *mut u32) -> HsakmtStatus {
    // NumGws = 0: KFD answers ENODEV, the thunk NOT_SUPPORTED.
    run(|_| Err(HSAKMT_STATUS_NOT_SUPPORTED))
}

// --- debug hook ----------------------------------------------------------

/// Counters for tests: `out[0..n]` gets faults raised, resolved, rejected,
/// timed out, cancelled (the device's `DEVICE_QUERY`), bound bytes, fault
/// records the thunk's interrupt thread handled, interrupts it saw, the
/// transport profile (1 compat, 2 native), whether the device offers user
/// queues (protocol 1.1 `USER_QUEUES`: 1, else 0), then the device's
/// `QUEUE_COUNTERS` (user-queue packets completed, copy bytes, interrupts
/// raised, doorbell polls; all 0 without user queues), then who resolves
/// the faults (1 the thunk's user-space resolver, 2 the guest kernel).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vgncKmtQueryCounters(out: *mut u64, n: u32) -> HsakmtStatus {
    run(|t| {
        let q = t.counters()?;
        let uq = t.queue_counters()?.unwrap_or_default();
        use std::sync::atomic::Ordering::Relaxed;
        let all = [
            q.faults_raised,
            q.faults_resolved,
            q.faults_rejected,
            q.faults_timed_out,
            q.faults_cancelled,
            q.bound_bytes,
            t.stats.faults_handled.load(Relaxed),
            t.stats.interrupts.load(Relaxed),
            match t.profile {
                guest_runtime::session::ProfileKind::Compat => 1,
                guest_runtime::session::ProfileKind::Native => 2,
            },
            u64::from(t.user_queues),
            uq.user_queue_packets,
            uq.copy_bytes,
            uq.interrupts,
            uq.doorbell_polls,
            match t.dev().session.resolver() {
                guest_runtime::session::Resolver::User => 1,
                guest_runtime::session::Resolver::Kernel => 2,
            },
        ];
        // SAFETY: the caller's array of `n`.
        unsafe { put_array(out, n, &all) }
    })
}

#[allow(dead_code)]
const _NODES: (u32, u32) = (CPU_NODE, GPU_NODE);
