//! The device-independent driver layer of one guest compute context.
//!
//! This is the part a kernel GPU driver would call its "VM + SVM" code. It
//! owns the context's [`GpuVm`] (what is mapped where) and its
//! [`DeviceVm`] (the page tables that make it so), and it holds the policy
//! that the device does not know about:
//!
//! - **Binding** follows drm_gpuvm's two steps: prepare a plan (may fail,
//!   changes nothing), apply it to the device, then commit it. Should the
//!   device fail half way, the range is unmapped on the device *and* in the
//!   bookkeeping, so the two never disagree.
//! - **Faults**: a device fault in the NULL guard or the reserved range, in
//!   a range with the fatal policy, or needing a permission the range's
//!   `ACCESS` attribute withholds, fails its work at once. Every other fault
//!   is coalesced per granule and forwarded to the guest through its fault
//!   ring ([`faults`]); the guest's answer replays or fails the work, and a
//!   guest that does not answer in time fails only its own work.
//! - **Quotas**: bound bytes are charged to the guest's shared
//!   [`BoundBytesQuota`]; queues and pending faults are capped per context.
//! - **User queues** (protocol 1.1): rings the device reads itself. The
//!   context checks their addresses against the aperture and their number
//!   against both queue quotas, and counts the interrupts they raise.
//!
//! A context is driven from one thread (the daemon's queue worker); the
//! device reaches it only through a small inbox ([`events`]), so no device
//! thread ever waits on the context.

pub mod events;
pub mod faults;
pub mod quota;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_proto::bind::BindOp;
use guest_proto::{DispatchStatus, Perms, ResourceId};
use guest_proto::{FaultId, FaultPolicy, GpuVa, GuestPhysAddr, Kernel, PAGE_SIZE, QueueId, Status};

use crate::device::{
    Completion, Device, DeviceError, DeviceVm, FaultAction, GuestRam, KernelLaunch, QueueDesc,
    UserQueueCounters, UserQueueDesc, VmConfig,
};
use crate::gpuvm::{
    AttrUpdate, GpuVm, GpuVmError, MapRequest, MappingBacking, Op, PageArray, ResourceSizes,
    VaLayout,
};

pub use crate::histogram::{LATENCY_BOUNDS_NS, LatencyHistogram};
use events::EventInbox;
pub use events::{DISPATCH_STATUSES, Waker};
pub use faults::{FaultCounters, FaultRing, FaultTracker, GuestAnswer};
pub use quota::BoundBytesQuota;

/// Most stored attribute ranges per context: bounds the memory a guest can
/// make the daemon spend on `RANGE_ATTR` alone.
pub const MAX_ATTR_RANGES: usize = 65_536;

/// Pages handed to the device per `map` call: bounds the temporary page
/// list whatever the size of the range.
const MAP_CHUNK_PAGES: usize = 512;

/// Guest memory behind resources, as the context needs it to bind them.
pub trait ResourceMemory: ResourceSizes {
    /// Appends to `out` the guest-physical addresses of the `count` pages of
    /// resource `id` that start at byte `offset` (page-aligned).
    fn pages(
        &self,
        id: ResourceId,
        offset: u64,
        count: usize,
        out: &mut Vec<GuestPhysAddr>,
    ) -> Result<(), ContextError>;
}

/// Settings of one context.
#[derive(Clone)]
pub struct ContextConfig {
    /// The VA layout (aperture and reserved range).
    pub layout: VaLayout,
    /// How long the guest has to answer a fault.
    pub fault_timeout: Duration,
    /// Most faults pending at once (device and guest side).
    pub max_pending_faults: u32,
    /// Most dispatches queued or running on one queue.
    pub max_queue_depth: u32,
    /// Most queues of the context (user queues included).
    pub max_queues: u32,
    /// Most user queues of the context (protocol 1.1).
    pub max_user_queues: u32,
    /// The guest's shared bound-bytes allowance.
    pub bound_quota: Arc<BoundBytesQuota>,
    /// Called from device threads when the context has new events, so the
    /// driving thread can run [`ComputeContext::pump`] early.
    pub waker: Option<Waker>,
}

impl std::fmt::Debug for ContextConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextConfig")
            .field("layout", &self.layout)
            .field("fault_timeout", &self.fault_timeout)
            .field("max_pending_faults", &self.max_pending_faults)
            .field("max_queue_depth", &self.max_queue_depth)
            .field("max_queues", &self.max_queues)
            .field("max_user_queues", &self.max_user_queues)
            .field("bound_quota", &self.bound_quota)
            .finish_non_exhaustive()
    }
}

/// Why a context operation failed; [`ContextError::status`] is the
/// protocol status the guest sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    /// The range manager refused the request.
    #[error(transparent)]
    GpuVm(#[from] GpuVmError),
    /// The device refused the request.
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    /// The guest's bound-bytes allowance would be exceeded.
    #[error("binding {needed:#x} more bytes exceeds the guest's quota of {limit:#x}")]
    BoundBytesQuota {
        /// Bytes the request would add.
        needed: u64,
        /// The allowance.
        limit: u64,
    },
    /// The context has its maximum number of attribute ranges.
    #[error("attribute range limit of {0} reached")]
    AttrQuota(usize),
    /// The context already has its maximum number of queues.
    #[error("queue limit of {0} reached")]
    QueueQuota(u32),
    /// The context already has its maximum number of user queues.
    #[error("user queue limit of {0} reached")]
    UserQueueQuota(u32),
    /// An address range a user queue would reach is outside the aperture.
    #[error("range {va}+{len:#x} is outside the aperture")]
    OutsideAperture {
        /// Start of the range.
        va: GpuVa,
        /// Its length.
        len: u64,
    },
    /// No such queue in this context.
    #[error("unknown queue {0:?}")]
    UnknownQueue(QueueId),
    /// The queue is full.
    #[error("queue {0:?} is full")]
    QueueFull(QueueId),
    /// The resource is unknown, not attached, or has no backing.
    #[error("resource {0:?} is unknown or has no guest backing")]
    UnknownResource(ResourceId),
    /// The resource's backing cannot be mapped page by page.
    #[error("resource {0:?} has backing that is not page aligned")]
    UnalignedBacking(ResourceId),
    /// A range lies past the end of a resource.
    #[error("range {offset:#x}+{len:#x} is past the end of resource {id:?}")]
    BeyondResource {
        /// The resource.
        id: ResourceId,
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// The context has been shut down.
    #[error("context is shut down")]
    ShutDown,
}

impl ContextError {
    /// The protocol status for this error (docs/protocol.md 4.3).
    pub fn status(&self) -> Status {
        match self {
            ContextError::GpuVm(e) => gpuvm_status(e),
            ContextError::Device(e) => device_status(e),
            ContextError::BoundBytesQuota { .. }
            | ContextError::QueueQuota(_)
            | ContextError::UserQueueQuota(_)
            | ContextError::AttrQuota(_) => Status::Quota,
            ContextError::OutsideAperture { .. } => Status::OutOfRange,
            ContextError::UnknownQueue(_) => Status::UnknownQueue,
            ContextError::QueueFull(_) => Status::QueueFull,
            ContextError::UnknownResource(_) => Status::UnknownResource,
            ContextError::UnalignedBacking(_) => Status::Misaligned,
            ContextError::BeyondResource { .. } => Status::OutOfRange,
            ContextError::ShutDown => Status::Device,
        }
    }
}

fn gpuvm_status(e: &GpuVmError) -> Status {
    match e {
        GpuVmError::ZeroSize(_) | GpuVmError::EmptyPerms | GpuVmError::BadGranule(_) => {
            Status::InvalidArgument
        }
        GpuVmError::Misaligned { .. } => Status::Misaligned,
        GpuVmError::UnknownResource(_) => Status::UnknownResource,
        _ => Status::OutOfRange,
    }
}

fn device_status(e: &DeviceError) -> Status {
    match e {
        DeviceError::VaOutOfRange { .. } | DeviceError::NotGuestRam(_) => Status::OutOfRange,
        DeviceError::Misaligned { .. } => Status::Misaligned,
        DeviceError::UnknownQueue(_) => Status::UnknownQueue,
        DeviceError::UnknownFault(_) => Status::UnknownFault,
        DeviceError::Limit(_) => Status::Quota,
        DeviceError::InvalidDispatch(_) | DeviceError::WrongQueueKind(_) => Status::InvalidArgument,
        DeviceError::Unsupported(_) => Status::Unsupported,
        DeviceError::Shutdown | DeviceError::AlreadyMapped(_) => Status::Device,
    }
}

/// Counters of a context, as `DEVICE_QUERY` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextStats {
    /// Fault counters.
    pub faults: FaultCounters,
    /// Dispatches that ended.
    pub dispatches_done: u64,
    /// Bytes bound in the aperture.
    pub bound_bytes: u64,
    /// Queues that exist (user queues included).
    pub queues: u32,
}

/// Counters of a context's user queues (protocol 14.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserQueueStats {
    /// What the device counted.
    pub device: UserQueueCounters,
    /// Interrupts raised (user queues and `NOTIFY` dispatches).
    pub interrupts: u64,
}

/// `VM_BIND` ops that succeeded and the bytes they named (protocol 5.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindCounters {
    /// `MAP_RESOURCE` and `MAP_PAGES` ops.
    pub binds: u64,
    /// Bytes those ops mapped (their `size`).
    pub bind_bytes: u64,
    /// `UNMAP` ops.
    pub unbinds: u64,
    /// Bytes those ops named (their `size`, bound or not).
    pub unbind_bytes: u64,
}

/// Everything a context counts, for the daemon's metrics
/// (docs/metrics.md): a superset of [`ContextStats`], read only when the
/// metrics are scraped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextMetrics {
    /// What `DEVICE_QUERY` reports.
    pub stats: ContextStats,
    /// Guest faults pending (written or waiting for room in the ring).
    pub faults_pending: u64,
    /// Raise-to-answer time of the faults the guest answered.
    pub fault_round_trips: LatencyHistogram,
    /// Successful `VM_BIND` ops.
    pub binds: BindCounters,
    /// Dispatches the device accepted.
    pub dispatches_started: u64,
    /// Dispatches that ended, by `DispatchStatus` value.
    pub dispatches_ended: [u64; DISPATCH_STATUSES],
    /// User queue counters (protocol 14.5).
    pub user_queues: UserQueueStats,
    /// The user queues' doorbell-to-first-packet latency (see
    /// [`DeviceVm::doorbell_latency`]).
    pub doorbell_latency: LatencyHistogram,
}

impl ContextMetrics {
    /// Dispatches accepted and not ended yet, over every compute queue.
    pub fn queue_depth(&self) -> u64 {
        let ended = self
            .dispatches_ended
            .iter()
            .fold(0u64, |a, b| a.saturating_add(*b));
        self.dispatches_started.saturating_sub(ended)
    }
}

/// A dispatch as the layer above asks for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DispatchRequest {
    /// The queue.
    pub queue: QueueId,
    /// The kernel with validated arguments.
    pub kernel: Kernel,
    /// Where to signal completion.
    pub completion: Option<Completion>,
    /// Post an event when it ends.
    pub notify: bool,
}

/// Tag bit marking a dispatch that posts an event when it ends.
const NOTIFY_TAG: u64 = 1 << 63;

/// One guest compute context: its GPU VM, queues and forwarded faults.
pub struct ComputeContext {
    vm: GpuVm,
    device_vm: Arc<dyn DeviceVm>,
    events: Arc<EventInbox>,
    faults: FaultTracker,
    queues: BTreeSet<QueueId>,
    user_queues: BTreeSet<QueueId>,
    interrupts_taken: u64,
    config: ContextConfig,
    next_tag: u64,
    shut_down: bool,
    binds: BindCounters,
    dispatches_started: u64,
}

impl std::fmt::Debug for ComputeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeContext")
            .field("bound_bytes", &self.vm.bound_bytes())
            .field("queues", &self.queues)
            .field("faults", &self.faults)
            .field("shut_down", &self.shut_down)
            .finish_non_exhaustive()
    }
}

impl ComputeContext {
    /// Creates the context's VM on `device`, over guest RAM `memory`.
    pub fn new(
        device: &dyn Device,
        memory: GuestRam,
        config: ContextConfig,
    ) -> Result<ComputeContext, ContextError> {
        let events = Arc::new(EventInbox::new(config.waker.clone()));
        let vm_config = VmConfig {
            memory,
            max_pending_faults: config.max_pending_faults,
            max_queue_depth: config.max_queue_depth,
        };
        let device_vm = device.create_vm(vm_config, events.clone())?;
        Ok(ComputeContext {
            vm: GpuVm::new(config.layout.clone()),
            device_vm,
            events,
            faults: FaultTracker::new(config.max_pending_faults, config.fault_timeout),
            queues: BTreeSet::new(),
            user_queues: BTreeSet::new(),
            interrupts_taken: 0,
            config,
            next_tag: 1,
            shut_down: false,
            binds: BindCounters::default(),
            dispatches_started: 0,
        })
    }

    /// The range manager (read only).
    pub fn gpuvm(&self) -> &GpuVm {
        &self.vm
    }

    /// Applies one `VM_BIND` op.
    pub fn bind(&mut self, op: &BindOp<'_>, res: &dyn ResourceMemory) -> Result<(), ContextError> {
        self.check_live()?;
        let result = self.apply_bind(op, res);
        if result.is_ok() {
            let b = &mut self.binds;
            match *op {
                BindOp::MapResource { size, .. } => {
                    b.binds += 1;
                    b.bind_bytes = b.bind_bytes.saturating_add(size);
                }
                BindOp::MapPages { ref pages, .. } => {
                    b.binds += 1;
                    b.bind_bytes = b.bind_bytes.saturating_add(pages.size());
                }
                BindOp::Unmap { size, .. } => {
                    b.unbinds += 1;
                    b.unbind_bytes = b.unbind_bytes.saturating_add(size);
                }
            }
        }
        result
    }

    fn apply_bind(
        &mut self,
        op: &BindOp<'_>,
        res: &dyn ResourceMemory,
    ) -> Result<(), ContextError> {
        match *op {
            BindOp::MapResource {
                va,
                size,
                perms,
                resource,
                offset,
            } => {
                let backing = MappingBacking::Resource {
                    id: resource,
                    offset,
                };
                self.map(
                    MapRequest {
                        va,
                        size,
                        backing,
                        perms,
                    },
                    res,
                    false,
                )
            }
            BindOp::MapPages { va, perms, pages } => {
                let list: Vec<GuestPhysAddr> = pages.iter().collect();
                let size = pages.size();
                let backing = MappingBacking::Pages(PageArray::new(list));
                self.map(
                    MapRequest {
                        va,
                        size,
                        backing,
                        perms,
                    },
                    res,
                    false,
                )
            }
            BindOp::Unmap { va, size } => self.unmap(va, size),
        }
    }

    /// Maps `size` bytes of resource `id` from `offset` at `va` in the
    /// reserved range (session memory the daemon itself places there).
    pub fn map_reserved(
        &mut self,
        va: GpuVa,
        size: u64,
        id: ResourceId,
        offset: u64,
        perms: Perms,
        res: &dyn ResourceMemory,
    ) -> Result<(), ContextError> {
        self.check_live()?;
        let backing = MappingBacking::Resource { id, offset };
        self.map(
            MapRequest {
                va,
                size,
                backing,
                perms,
            },
            res,
            true,
        )
    }

    fn map(
        &mut self,
        req: MapRequest,
        res: &dyn ResourceMemory,
        reserved: bool,
    ) -> Result<(), ContextError> {
        let (va, size) = (req.va, req.size);
        let before = self.vm.bound_bytes();
        let plan = if reserved {
            self.vm.prepare_map_reserved(req.clone(), res)?
        } else {
            self.vm.prepare_map(req.clone(), res)?
        };
        if plan.is_empty() {
            // Already mapped exactly so (see `gpuvm`): the device keeps its
            // translations, so running work does not fault on them again.
            return Ok(());
        }
        // Reserved mappings are the daemon's, never charged to the guest.
        let charge = if reserved {
            0
        } else {
            plan.bound_bytes_after().saturating_sub(before)
        };
        if !self.config.bound_quota.try_charge(charge) {
            return Err(ContextError::BoundBytesQuota {
                needed: charge,
                limit: self.config.bound_quota.limit(),
            });
        }
        let device_vm = self.device_vm.clone();
        // Only a plan that removes something needs the range cleared on the
        // device first; over an unmapped range that would only drain the
        // running waves for nothing.
        let replaces = plan.ops().iter().any(|op| !matches!(op, Op::Map(_)));
        let cleared = if replaces {
            device_vm.unmap(va, size).map_err(ContextError::from)
        } else {
            Ok(())
        };
        let result = cleared.and_then(|()| map_on_device(device_vm.as_ref(), &req, res));
        match result {
            Ok(()) => {
                // The plan's map adds `size` and its unmaps and remaps
                // remove exactly what `replaced_bytes` counted: the charge
                // is the net change.
                plan.commit();
                Ok(())
            }
            Err(e) => {
                drop(plan);
                // The old translations of the range are gone from the
                // device (or were never touched); make the bookkeeping say
                // the same: the range is unmapped.
                let _ = device_vm.unmap(va, size);
                self.config.bound_quota.release(charge);
                if !reserved {
                    let old = self.vm.bound_bytes();
                    if let Ok(unmap) = self.vm.prepare_unmap(va, size) {
                        unmap.commit();
                    }
                    self.config
                        .bound_quota
                        .release(old.saturating_sub(self.vm.bound_bytes()));
                }
                Err(e)
            }
        }
    }

    fn unmap(&mut self, va: GpuVa, size: u64) -> Result<(), ContextError> {
        let before = self.vm.bound_bytes();
        let plan = self.vm.prepare_unmap(va, size)?;
        if !plan.is_empty() {
            self.device_vm.unmap(va, size)?;
        }
        plan.commit();
        self.config
            .bound_quota
            .release(before.saturating_sub(self.vm.bound_bytes()));
        Ok(())
    }

    /// Unmaps every mapping backed by resource `id` (its backing is going
    /// away); returns when the device can no longer reach those pages.
    pub fn unmap_resource(&mut self, id: ResourceId) {
        let before = self.vm.bound_bytes();
        let plan = self.vm.prepare_unmap_resource(id);
        for op in plan.ops() {
            if let Op::Unmap(m) = op {
                if let Err(e) = self.device_vm.unmap(m.va, m.size) {
                    log::warn!("unmapping {:?} of {id:?}: {e}", m.va);
                }
            }
        }
        plan.commit();
        self.config
            .bound_quota
            .release(before.saturating_sub(self.vm.bound_bytes()));
    }

    /// Sets range attributes; with `prefault`, queues one prefault record
    /// for every granule of the range that has an unbound page (as many as
    /// the pending cap allows).
    pub fn set_attrs(
        &mut self,
        va: GpuVa,
        size: u64,
        update: AttrUpdate,
        prefault: bool,
    ) -> Result<(), ContextError> {
        self.check_live()?;
        // One request adds at most two stored ranges (the split ends) and
        // one for the range itself.
        if self.vm.attr_range_count().saturating_add(3) > MAX_ATTR_RANGES {
            return Err(ContextError::AttrQuota(MAX_ATTR_RANGES));
        }
        self.vm.set_attrs(va, size, update)?;
        if prefault {
            self.queue_prefault(va, size);
        }
        Ok(())
    }

    fn queue_prefault(&mut self, va: GpuVa, size: u64) {
        let now = Instant::now();
        let end = va.raw().saturating_add(size);
        let mut at = va.raw();
        while at < end && self.faults.has_room() {
            let shift = self.vm.attrs_at(GpuVa(at)).granule_shift;
            let granule = 1u64 << shift;
            let granule_end = ((at | (granule - 1)).saturating_add(1)).min(end);
            if let Some(hole) = first_unbound_page(&self.vm, at, granule_end) {
                self.faults.add_prefault(GpuVa(hole), shift, now);
            }
            at = granule_end;
        }
    }

    /// Creates a queue.
    pub fn create_queue(&mut self, priority: u8) -> Result<QueueId, ContextError> {
        self.check_live()?;
        if self.queue_count() >= usize::try_from(self.config.max_queues).unwrap_or(usize::MAX) {
            return Err(ContextError::QueueQuota(self.config.max_queues));
        }
        let id = self.device_vm.create_queue(QueueDesc { priority })?;
        self.queues.insert(id);
        Ok(id)
    }

    fn queue_count(&self) -> usize {
        self.queues.len().saturating_add(self.user_queues.len())
    }

    /// Whether `va .. va + len` lies in the aperture.
    pub fn in_aperture(&self, va: GpuVa, len: u64) -> bool {
        let aperture = &self.config.layout.aperture;
        va >= aperture.start && va.checked_add(len).is_some_and(|end| end <= aperture.end)
    }

    /// Creates a user-mode queue (protocol 1.1, 14.2): every range it
    /// reaches must lie in the aperture, and it counts against both queue
    /// quotas.
    pub fn create_user_queue(&mut self, desc: UserQueueDesc) -> Result<QueueId, ContextError> {
        self.check_live()?;
        let ranges = [
            (desc.ring, desc.ring_size),
            (desc.rptr, 8),
            (desc.doorbell, 8),
        ]
        .into_iter()
        .chain(desc.status.map(|s| (s, guest_proto::uq::STATUS_BLOCK_SIZE)));
        for (va, len) in ranges {
            if !self.in_aperture(va, len) {
                return Err(ContextError::OutsideAperture { va, len });
            }
        }
        if self.queue_count() >= usize::try_from(self.config.max_queues).unwrap_or(usize::MAX) {
            return Err(ContextError::QueueQuota(self.config.max_queues));
        }
        let max_user = self.config.max_user_queues;
        if self.user_queues.len() >= usize::try_from(max_user).unwrap_or(usize::MAX) {
            return Err(ContextError::UserQueueQuota(max_user));
        }
        let id = match self.device_vm.create_user_queue(desc) {
            Ok(id) => id,
            Err(DeviceError::Limit(_)) => {
                return Err(ContextError::QueueQuota(self.config.max_queues));
            }
            Err(e) => return Err(e.into()),
        };
        self.user_queues.insert(id);
        Ok(id)
    }

    /// Looks at every doorbell of the context's user queues now.
    pub fn kick(&self) {
        if !self.shut_down && !self.user_queues.is_empty() {
            self.device_vm.kick();
        }
    }

    /// Interrupts raised since the last call (user queues and `NOTIFY`
    /// dispatches, protocol 14.7).
    pub fn take_interrupts(&mut self) -> u64 {
        let total = self.events.interrupts();
        let new = total.saturating_sub(self.interrupts_taken);
        self.interrupts_taken = total;
        new
    }

    /// The user queue counters.
    pub fn user_queue_stats(&self) -> UserQueueStats {
        UserQueueStats {
            device: self.device_vm.user_queue_counters(),
            interrupts: self.events.interrupts(),
        }
    }

    /// Destroys a queue of either kind: a compute queue's work ends
    /// `CANCELLED`; a user queue stops and, when this returns, the device
    /// makes no further access to its memory.
    pub fn destroy_queue(&mut self, queue: QueueId) -> Result<(), ContextError> {
        self.check_live()?;
        if !self.queues.remove(&queue) && !self.user_queues.remove(&queue) {
            return Err(ContextError::UnknownQueue(queue));
        }
        self.device_vm.destroy_queue(queue)?;
        Ok(())
    }

    /// Queues a dispatch.
    pub fn dispatch(&mut self, req: DispatchRequest) -> Result<(), ContextError> {
        self.check_live()?;
        if self.user_queues.contains(&req.queue) {
            return Err(DeviceError::WrongQueueKind(req.queue).into());
        }
        if !self.queues.contains(&req.queue) {
            return Err(ContextError::UnknownQueue(req.queue));
        }
        let mut tag = self.next_tag & !NOTIFY_TAG;
        self.next_tag = self.next_tag.wrapping_add(1);
        if req.notify {
            tag |= NOTIFY_TAG;
        }
        let dispatch = KernelLaunch {
            kernel: req.kernel,
            completion: req.completion,
            tag,
        };
        match self.device_vm.dispatch(req.queue, dispatch) {
            Ok(()) => {
                self.dispatches_started += 1;
                Ok(())
            }
            Err(DeviceError::Limit(_)) => Err(ContextError::QueueFull(req.queue)),
            Err(e) => Err(e.into()),
        }
    }

    /// The guest answered fault `id`; false if it was not pending.
    pub fn answer_fault(&mut self, id: FaultId, answer: GuestAnswer) -> bool {
        let Some(device_faults) = self.faults.answer(id, answer) else {
            return false;
        };
        let reply = match answer {
            GuestAnswer::Resolved => FaultAction::Replay,
            GuestAnswer::Rejected => FaultAction::Cancel(DispatchStatus::FaultRejected),
        };
        for fault in device_faults {
            // A device fault may already have ended (its queue was
            // destroyed); that is not the guest's error.
            let _ = self.device_vm.reply_fault(fault, reply);
        }
        true
    }

    /// Writes every pending fault again, oldest first, at the next
    /// [`ComputeContext::pump`] (into the ring given then): a guest kernel
    /// took the context's faults over (protocol 1.1 `SVM_ATTACH`).
    pub fn repost_faults(&mut self) {
        self.faults.repost_all();
    }

    /// Ends every pending fault as rejected: their work fails with
    /// `FAULT_REJECTED` (protocol 1.1 `SVM_DETACH`: nobody is left to
    /// answer them).
    pub fn reject_faults(&mut self) {
        for fault in self.faults.reject_all() {
            let _ = self
                .device_vm
                .reply_fault(fault, FaultAction::Cancel(DispatchStatus::FaultRejected));
        }
    }

    /// Moves events from the device into the context: classifies new
    /// faults (fatal ones end at once, the rest are forwarded), ends
    /// faults past their deadline, and writes deferred records into `ring`.
    /// Returns the number of records written.
    pub fn pump(&mut self, ring: &mut dyn FaultRing, now: Instant) -> usize {
        for fault in self.events.take_faults() {
            match self.classify(fault.va, fault.access) {
                Some(shift) => self.faults.add_device_fault(&fault, shift, now),
                None => {
                    let _ = self
                        .device_vm
                        .reply_fault(fault.id, FaultAction::Cancel(DispatchStatus::FaultFatal));
                }
            }
        }
        for (_, fault) in self.faults.expire(now) {
            let _ = self
                .device_vm
                .reply_fault(fault, FaultAction::Cancel(DispatchStatus::FaultTimedOut));
        }
        self.faults.flush(ring)
    }

    /// The granule shift to forward a fault at `va` with, or `None` if the
    /// fault is fatal.
    fn classify(&self, va: GpuVa, access: guest_proto::AccessFlags) -> Option<u8> {
        let aperture = &self.config.layout.aperture;
        if va < aperture.start || va >= aperture.end {
            return None;
        }
        let attrs = self.vm.attrs_at(va);
        let allowed = attrs.access.contains(access.required_perms());
        (attrs.fault_policy == FaultPolicy::Recoverable && allowed).then_some(attrs.granule_shift)
    }

    /// Whether guest faults are pending (answered by nobody yet, or
    /// waiting for room in the ring), or device faults wait in the inbox.
    pub fn has_pending_faults(&self) -> bool {
        self.faults.pending() > 0 || self.events.has_faults()
    }

    /// Whether a `NOTIFY` dispatch ended since the last call.
    pub fn take_notify(&mut self) -> bool {
        self.events.take_notify()
    }

    /// The counters.
    pub fn stats(&self) -> ContextStats {
        ContextStats {
            faults: self.faults.counters(),
            dispatches_done: self.events.dispatches_done(),
            bound_bytes: self.vm.bound_bytes(),
            queues: u32::try_from(self.queue_count()).unwrap_or(u32::MAX),
        }
    }

    /// Everything the context counts, for the daemon's metrics: what
    /// [`ComputeContext::stats`] reports and more (a few atomic loads and
    /// a copy; called when the metrics are scraped, not per request).
    pub fn metrics(&self) -> ContextMetrics {
        ContextMetrics {
            stats: self.stats(),
            faults_pending: self.faults.pending() as u64,
            fault_round_trips: *self.faults.round_trips(),
            binds: self.binds,
            dispatches_started: self.dispatches_started,
            dispatches_ended: self.events.dispatches_by_status(),
            user_queues: self.user_queue_stats(),
            doorbell_latency: self.device_vm.doorbell_latency(),
        }
    }

    /// Cancels all work and faults, unmaps everything and releases the
    /// device VM. Returns when the device no longer touches guest memory.
    /// Idempotent; also done on drop.
    pub fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        self.device_vm.shutdown();
        self.faults.cancel_all();
        self.config.bound_quota.release(self.vm.bound_bytes());
        self.vm.clear();
        self.queues.clear();
        self.user_queues.clear();
    }

    fn check_live(&self) -> Result<(), ContextError> {
        if self.shut_down {
            Err(ContextError::ShutDown)
        } else {
            Ok(())
        }
    }
}

impl Drop for ComputeContext {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Maps the pages of `req` on the device, in bounded chunks.
fn map_on_device(
    device_vm: &dyn DeviceVm,
    req: &MapRequest,
    res: &dyn ResourceMemory,
) -> Result<(), ContextError> {
    let total = usize::try_from(req.size / PAGE_SIZE).unwrap_or(usize::MAX);
    let mut chunk = Vec::with_capacity(MAP_CHUNK_PAGES.min(total));
    let mut done = 0usize;
    while done < total {
        let n = MAP_CHUNK_PAGES.min(total - done);
        chunk.clear();
        let byte_off = (done as u64) * PAGE_SIZE;
        match &req.backing {
            MappingBacking::Resource { id, offset } => {
                res.pages(*id, offset.saturating_add(byte_off), n, &mut chunk)?;
            }
            MappingBacking::Pages(list) => {
                let pages = list
                    .pages()
                    .get(done..done + n)
                    .ok_or(ContextError::Device(DeviceError::VaOutOfRange {
                        va: req.va,
                        len: req.size,
                    }))?;
                chunk.extend_from_slice(pages);
            }
        }
        let va = GpuVa(req.va.raw().saturating_add(byte_off));
        device_vm.map(va, &chunk, req.perms)?;
        done += n;
    }
    Ok(())
}

/// The first page in `[start, end)` no mapping covers.
fn first_unbound_page(vm: &GpuVm, start: u64, end: u64) -> Option<u64> {
    let mut at = start;
    for m in vm.mappings_in(GpuVa(start), end - start) {
        if m.va.raw() > at {
            return Some(at);
        }
        at = at.max(m.end().raw());
        if at >= end {
            return None;
        }
    }
    (at < end).then_some(at)
}
