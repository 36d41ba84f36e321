//! The hardware abstraction: what a GPU driver provides to the
//! device-independent layers above it.
//!
//! The split follows the Linux DRM stack. The range manager (`GpuVm`) decides
//! *what* is mapped where and is the same for every device; a [`Device`]
//! only applies the result to its page tables, runs work on its queues, and
//! reports recoverable faults. Policy (which faults are fatal, which are
//! forwarded to the guest, timeouts, quotas) lives above this trait.
//!
//! Contract for implementors:
//! - [`DeviceVm::unmap`] returns only when no access through the removed
//!   translations can still happen (TLBs shot down, accesses in flight
//!   drained): the caller may hand the pages back to the guest right away.
//! - Every fault the device reports through [`VmEvents::faults`] stays
//!   pending, with the work that raised it stalled, until
//!   [`DeviceVm::reply_fault`] ends it: `Replay` retries the stalled work,
//!   `Cancel` fails the dispatches that raised it. A fault ends exactly once.
//! - The device never calls [`VmEvents`] while holding a lock that
//!   [`DeviceVm`] methods take: the receiver may call back into the VM.
//! - Guest memory is reached only through [`GuestRam`]: a page outside
//!   guest RAM is an error, never a host access.
//! - User-mode queues ([`DeviceVm::create_user_queue`], protocol 1.1
//!   section 14) are queues like any other: their ids share the queue id
//!   space, their faults are reported and ended like a dispatch's, and
//!   [`DeviceVm::destroy_queue`] destroys them. The device reads their
//!   rings, doorbells and every memory their packets name through the VM's
//!   own page tables, so unmap and fault semantics hold for them too.

use std::sync::Arc;

use guest_proto::signal::DispatchStatus;
use guest_proto::uq::{QueueStopStatus, UserQueueKind};
use guest_proto::{AccessFlags, FaultId, GpuVa, GuestPhysAddr, Kernel, Perms, QueueId};

/// Guest RAM as the vhost-user frontend shared it.
pub type GuestRam = vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>;

/// Static properties of a device, reported to the guest in the capset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Human-readable model name.
    pub name: String,
    /// Width of a GPU virtual address.
    pub va_bits: u8,
    /// Bit `n` set: the device can map pages of `1 << n` bytes.
    pub page_sizes: u64,
    /// Number of compute units (worker threads in the simulation).
    pub compute_units: u32,
    /// Most queues one VM may have.
    pub max_queues_per_vm: u32,
    /// Bit `1 << kernel id` for every kernel the device runs.
    pub kernels: u64,
    /// Whether faults stall and replay instead of killing the work.
    pub recoverable_faults: bool,
    /// Bit `1 << kind` for every user queue kind the device runs
    /// (`guest_proto::uq::UserQueueKind`); 0 without user queues.
    pub user_queue_kinds: u32,
}

/// Per-VM settings chosen by the layer above.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The guest RAM this VM's pages live in.
    pub memory: GuestRam,
    /// Most faults that may be pending at once; further faulting work waits
    /// (and retries) until earlier faults end.
    pub max_pending_faults: u32,
    /// Most dispatches queued or running on one queue.
    pub max_queue_depth: u32,
}

/// Parameters of a new compute queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueDesc {
    /// Scheduling priority, 0 (lowest) to 15.
    pub priority: u8,
}

/// Parameters of a user-mode queue (protocol 1.1, 14.2). Every address is
/// a VA of the VM the queue belongs to; none needs to be mapped yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserQueueDesc {
    /// SDMA or AQL.
    pub kind: UserQueueKind,
    /// Scheduling priority, 0 (lowest) to 15.
    pub priority: u8,
    /// Ring base (256-aligned).
    pub ring: GpuVa,
    /// Ring size: a power of two, 4 KiB ..= 64 MiB.
    pub ring_size: u64,
    /// The `u64` read pointer the device writes.
    pub rptr: GpuVa,
    /// The `u64` doorbell the device watches.
    pub doorbell: GpuVa,
    /// The 64-byte status block written when the queue stops, if any.
    pub status: Option<GpuVa>,
}

/// Counters of a VM's user queues since it was created (protocol 14.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserQueueCounters {
    /// Packets that completed.
    pub packets: u64,
    /// Bytes written by copies and fills.
    pub copy_bytes: u64,
    /// Doorbell loads.
    pub doorbell_polls: u64,
}

/// An interrupt a user queue raised (protocol 14.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interrupt {
    /// An SDMA `TRAP` packet.
    Trap {
        /// The queue.
        queue: QueueId,
        /// The packet's `int_ctx`.
        int_ctx: u32,
    },
    /// An AQL completion signal with an event mailbox was signalled.
    Signal {
        /// The queue.
        queue: QueueId,
        /// The signal's `event_id` (stored in the mailbox).
        event_id: u32,
    },
    /// The queue stopped; its status block has been written.
    QueueStopped {
        /// The queue.
        queue: QueueId,
        /// Why.
        status: QueueStopStatus,
    },
}

/// Where and what the device writes when a dispatch ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// GPU VA of a 32-byte signal slot (see `guest_proto::signal`), written
    /// through the VM's own page tables.
    pub signal: GpuVa,
    /// The value stored in the slot's `value` field, last.
    pub value: u64,
}

/// One kernel launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelLaunch {
    /// The kernel and its (validated) arguments.
    pub kernel: Kernel,
    /// The signal to write on completion, if any.
    pub completion: Option<Completion>,
    /// Opaque value handed back in [`VmEvents::dispatch_done`].
    pub tag: u64,
}

/// A recoverable fault as the device reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFault {
    /// Unique for the lifetime of the VM.
    pub id: FaultId,
    /// The queue whose work faulted first.
    pub queue: QueueId,
    /// The faulting page (page-aligned).
    pub va: GpuVa,
    /// Union of the accesses that hit this page while the fault was pending.
    pub access: AccessFlags,
    /// How many accesses were merged into this record (at least 1).
    pub merged: u32,
}

/// How a pending fault ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// The translation was fixed: retry the stalled work.
    Replay,
    /// Fail every dispatch stalled on the fault with this status.
    Cancel(DispatchStatus),
}

/// Errors a device reports to the layer above.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// The VA range is outside what the page tables can address, or wraps.
    #[error("GPU VA range {va}+{len:#x} is outside the device's address space")]
    VaOutOfRange {
        /// Start of the range.
        va: GpuVa,
        /// Length of the range.
        len: u64,
    },
    /// An address or size is not a multiple of the page size.
    #[error("{what} {value:#x} is not page aligned")]
    Misaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A page in the range is already mapped (`map` replaces nothing).
    #[error("GPU VA {0} is already mapped")]
    AlreadyMapped(GpuVa),
    /// A page to be mapped is not inside guest RAM.
    #[error("guest-physical page {0} is not guest RAM")]
    NotGuestRam(GuestPhysAddr),
    /// The queue does not exist in this VM.
    #[error("unknown queue {0:?}")]
    UnknownQueue(QueueId),
    /// The fault does not exist or has already ended.
    #[error("unknown fault {0:?}")]
    UnknownFault(FaultId),
    /// A per-VM limit was reached.
    #[error("{0} limit reached")]
    Limit(&'static str),
    /// The kernel is not supported or its arguments are invalid.
    #[error("invalid dispatch: {0}")]
    InvalidDispatch(&'static str),
    /// The VM has been shut down.
    #[error("VM is shut down")]
    Shutdown,
    /// The device does not offer this.
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    /// The operation does not apply to this kind of queue (a dispatch on a
    /// user queue).
    #[error("queue {0:?} is a user queue")]
    WrongQueueKind(QueueId),
}

/// Notifications from a device VM to the layer above (the "interrupt
/// handler"). Called from device threads, never with device locks held.
pub trait VmEvents: Send + Sync {
    /// New faults, in the order they were raised. Each stays pending until
    /// [`DeviceVm::reply_fault`] ends it.
    fn faults(&self, batch: &[DeviceFault]);

    /// A dispatch ended; its completion signal (if any) has been written.
    fn dispatch_done(&self, queue: QueueId, tag: u64, status: DispatchStatus);

    /// A user queue raised an interrupt (protocol 14.7). Devices without
    /// user queues never call it.
    fn interrupt(&self, irq: Interrupt) {
        let _ = irq;
    }
}

/// A GPU driver: creates one address space per guest context.
pub trait Device: Send + Sync {
    /// Static properties.
    fn info(&self) -> &DeviceInfo;

    /// Creates an empty address space with its own page tables.
    fn create_vm(
        &self,
        config: VmConfig,
        events: Arc<dyn VmEvents>,
    ) -> Result<Arc<dyn DeviceVm>, DeviceError>;
}

/// One GPU address space on the device, with its queues.
pub trait DeviceVm: Send + Sync {
    /// Maps `pages.len()` pages at `va` (page-aligned) with `perms`,
    /// replacing nothing: the range must be unmapped.
    fn map(&self, va: GpuVa, pages: &[GuestPhysAddr], perms: Perms) -> Result<(), DeviceError>;

    /// Removes every translation in `[va, va + len)`. Returns when no access
    /// through them can happen any more.
    fn unmap(&self, va: GpuVa, len: u64) -> Result<(), DeviceError>;

    /// Creates a compute queue.
    fn create_queue(&self, desc: QueueDesc) -> Result<QueueId, DeviceError>;

    /// Destroys a queue: its queued and running dispatches end `Cancelled`,
    /// faults only they were waiting on end. Returns when the queue is idle.
    /// For a user queue: the packet in progress is abandoned, the device
    /// faults only it waited on end, its status block is not written, and
    /// when this returns the device makes no further access to its ring,
    /// doorbell, read pointer, status block or packet memory.
    fn destroy_queue(&self, queue: QueueId) -> Result<(), DeviceError>;

    /// Queues a dispatch; dispatches on one queue run in order. A user
    /// queue takes no dispatches ([`DeviceError::WrongQueueKind`]).
    fn dispatch(&self, queue: QueueId, dispatch: KernelLaunch) -> Result<(), DeviceError>;

    /// Creates a user-mode queue whose ring the device reads itself
    /// (protocol 1.1, section 14). From then on the device watches its
    /// doorbell under the budget of 14.11 and executes its packets in
    /// order, every access through this VM: an unbound page raises a fault
    /// for the queue (reported through [`VmEvents::faults`], ended by
    /// [`DeviceVm::reply_fault`]) and the packet resumes on replay with
    /// every effect applied exactly once; a cancelled fault, a bad packet
    /// or a lying doorbell stops the queue (status block, then
    /// [`Interrupt::QueueStopped`]). Counts against the VM's queue limit.
    fn create_user_queue(&self, desc: UserQueueDesc) -> Result<QueueId, DeviceError> {
        let _ = desc;
        Err(DeviceError::Unsupported("user queues"))
    }

    /// Looks at every doorbell of the VM's user queues now (a hint, 14.4).
    fn kick(&self) {}

    /// Counters of the VM's user queues.
    fn user_queue_counters(&self) -> UserQueueCounters {
        UserQueueCounters::default()
    }

    /// How long the VM's user queues took from the last moment the device
    /// knew a queue had no new work (its last doorbell look that found
    /// none, or a later kick) to the first packet of the new work
    /// completing: the doorbell-to-first-packet latency as the device sees
    /// it, for the metrics. Empty for devices without user queues.
    fn doorbell_latency(&self) -> crate::histogram::LatencyHistogram {
        crate::histogram::LatencyHistogram::default()
    }

    /// Ends a pending fault.
    fn reply_fault(&self, fault: FaultId, reply: FaultAction) -> Result<(), DeviceError>;

    /// Cancels all work and pending faults and releases the page tables.
    /// Returns when nothing of this VM runs any more. Idempotent.
    fn shutdown(&self);
}
