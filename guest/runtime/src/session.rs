//! A native-context session from the guest side: discovery, the session's
//! shared memory, requests and replies, queues, signals and the fault
//! resolver (docs/protocol.md sections 3, 5, 7, 8, 9).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use guest_proto::bind::{BindOp, PageList};
use guest_proto::capset::{CAPSET_MAX_VERSION, CAPSET_SIZE, Capset, VGNC_CAPSET_ID};
use guest_proto::command::{DecodeLimits, Dispatch, Profile};
use guest_proto::fault::{FaultCause, FaultOutcome, FaultRecord, FaultReplyEntry};
use guest_proto::reply::{DeviceQueryReply, Reply};
use guest_proto::signal::SignalSlot;
use guest_proto::{
    AccessFlags, DispatchStatus, FaultId, GpuVa, GuestPhysAddr, Kernel, PAGE_SIZE, Perms, QueueId,
    Request, ResourceId, SignalIndex, Status,
};

use crate::client::{Channel, Client, SessionLayout};
use crate::drm::{Bo, Drm, param};
use crate::memory;
use crate::mmap::Mmap;
use crate::procmaps;
use crate::{GuestError, Result};

/// A virtio-gpu render node serving our capset, as this guest sees it.
#[derive(Debug)]
pub struct RenderNode {
    drm: Arc<Drm>,
    /// Render node path.
    pub path: PathBuf,
    /// The decoded capset.
    pub capset: Capset,
    /// `VIRTGPU_PARAM_3D_FEATURES`.
    pub virgl: bool,
    /// `VIRTGPU_PARAM_CONTEXT_INIT`.
    pub context_init: bool,
    /// `VIRTGPU_PARAM_RESOURCE_BLOB`.
    pub blob: bool,
}

/// The transport profile (section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileKind {
    /// Stock QEMU: memory polling.
    Compat,
    /// CONTEXT_INIT + blobs: event ring.
    Native,
}

impl RenderNode {
    /// Opens the first render node whose device serves our capset.
    pub fn open() -> Result<RenderNode> {
        let mut last = GuestError::NoDevice;
        for minor in 128..136 {
            let path = PathBuf::from(format!("/dev/dri/renderD{minor}"));
            if !path.exists() {
                continue;
            }
            match Self::probe(path) {
                Ok(d) => return Ok(d),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn probe(path: PathBuf) -> Result<RenderNode> {
        let drm = Drm::open(&path).map_err(|e| GuestError::io("open render node", e))?;
        let on = |p| drm.param(p).is_some_and(|v| v != 0);
        let (virgl, context_init, blob) = (
            on(param::FEATURES_3D),
            on(param::CONTEXT_INIT),
            on(param::RESOURCE_BLOB),
        );
        let raw = drm
            .capset(VGNC_CAPSET_ID, CAPSET_MAX_VERSION, CAPSET_SIZE)
            .map_err(|e| GuestError::io("GET_CAPS 24", e))?;
        let capset = Capset::decode(&raw).map_err(GuestError::Decode)?;
        Ok(RenderNode {
            drm: Arc::new(drm),
            path,
            capset,
            virgl,
            context_init,
            blob,
        })
    }

    /// The profile the features allow.
    pub fn profile(&self) -> ProfileKind {
        if self.context_init && self.blob {
            ProfileKind::Native
        } else {
            ProfileKind::Compat
        }
    }
}

/// A device buffer shared with the device, mapped into this process.
#[derive(Debug)]
pub struct SharedBuffer {
    /// GEM handle and resource id.
    pub bo: Bo,
    /// The mapping.
    pub map: Mmap,
}

impl SharedBuffer {
    /// The resource id.
    pub fn resource(&self) -> ResourceId {
        ResourceId(self.bo.res_id)
    }
}

/// Granules resolved per `SUBMIT_3D`.
const RESOLVE_BATCH: usize = 16;

/// What the resolver does with faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolvePolicy {
    /// Bind memory the process owns, reject the rest.
    Resolve,
    /// Reject everything.
    RejectAll,
    /// Never answer (a guest that hangs).
    Ignore,
    /// Own the whole process (XNACK on): besides the owned ranges, bind
    /// any address that `/proc/self/maps` shows mapped with the access the
    /// fault needs (readable; writable for writes and atomics), except
    /// device-buffer mappings, which are bound explicitly; reject the rest.
    Process,
}

/// A range of process memory the GPU may reach at a GPU VA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnedRange {
    /// GPU VA of the first byte.
    pub gpu: u64,
    /// CPU address of the first byte.
    pub cpu: u64,
    /// Length in bytes (page multiple).
    pub len: u64,
}

/// The session buffer through the render node: `EXECBUFFER` to submit,
/// an `mmap` of the buffer for replies, the fault ring and signals.
#[derive(Debug)]
pub struct DrmChannel {
    drm: Arc<Drm>,
    map: Mmap,
}

fn out_of_bounds() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "outside the session buffer",
    )
}

impl DrmChannel {
    fn at(off: u64) -> std::io::Result<usize> {
        usize::try_from(off).map_err(|_| out_of_bounds())
    }
}

impl Channel for DrmChannel {
    fn submit(&mut self, stream: &[u8], ring: Option<u32>) -> std::io::Result<()> {
        self.drm.execbuffer(stream, ring)
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.map.read(Self::at(off)?, buf).ok_or_else(out_of_bounds)
    }

    fn write(&self, off: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.map
            .write(Self::at(off)?, bytes)
            .ok_or_else(out_of_bounds)
    }

    fn load_u32(&self, off: u64) -> std::io::Result<u32> {
        self.map.load_u32(Self::at(off)?).ok_or_else(out_of_bounds)
    }

    fn load_u64(&self, off: u64) -> std::io::Result<u64> {
        self.map.load_u64(Self::at(off)?).ok_or_else(out_of_bounds)
    }

    fn store_u32(&self, off: u64, value: u32) -> std::io::Result<()> {
        self.map
            .store_u32(Self::at(off)?, value)
            .ok_or_else(out_of_bounds)
    }
}

/// A session of one render-node file, with its user-space fault resolver.
#[derive(Debug)]
pub struct Session {
    node: RenderNode,
    profile: ProfileKind,
    client: Client<DrmChannel>,
    session_buffer: Bo,
    ranges: Vec<OwnedRange>,
    policy: ResolvePolicy,
    signals_va: GpuVa,
    run_count: u64,
}

impl Session {
    /// Opens a session on `node` with its profile.
    pub fn open(node: RenderNode) -> Result<Session> {
        let profile = node.profile();
        if profile == ProfileKind::Native {
            node.drm
                .context_init(VGNC_CAPSET_ID, 2, 1 << 1)
                .map_err(|e| GuestError::io("CONTEXT_INIT", e))?;
        }
        let layout = SessionLayout::default();
        let SharedBuffer { bo, map } = alloc(&node.drm, profile, layout.bytes())?;
        let channel = DrmChannel {
            drm: node.drm.clone(),
            map,
        };
        let (ring, wire_profile) = match profile {
            ProfileKind::Compat => (None, Profile::Compat),
            ProfileKind::Native => (Some(0), Profile::Native { event_ring: 1 }),
        };
        let limits = DecodeLimits::from_capset(&node.capset);
        let mut client = Client::new(channel, layout, limits, ring);
        let init = client.start(ResourceId(bo.res_id), wire_profile)?;
        Ok(Session {
            node,
            profile,
            client,
            session_buffer: bo,
            ranges: Vec::new(),
            policy: ResolvePolicy::Resolve,
            signals_va: init.signals_va,
            run_count: 0,
        })
    }

    /// The render node.
    pub fn node(&self) -> &RenderNode {
        &self.node
    }

    /// The profile in use.
    pub fn profile(&self) -> ProfileKind {
        self.profile
    }

    /// The protocol client.
    pub fn client(&mut self) -> &mut Client<DrmChannel> {
        &mut self.client
    }

    /// Where the device mapped the signal area.
    pub fn signals_va(&self) -> GpuVa {
        self.signals_va
    }

    /// The session buffer's resource id.
    pub fn session_resource(&self) -> ResourceId {
        ResourceId(self.session_buffer.res_id)
    }

    /// Fault records read so far.
    pub fn faults_seen(&self) -> u64 {
        self.client.faults_seen()
    }

    /// Sets what the resolver does.
    pub fn set_policy(&mut self, policy: ResolvePolicy) {
        self.policy = policy;
    }

    /// Lets the resolver bind `range` on faults.
    pub fn own(&mut self, range: OwnedRange) {
        self.ranges.push(range);
    }

    /// A new shared buffer of `size` bytes, mapped.
    pub fn alloc(&self, size: u64) -> Result<SharedBuffer> {
        alloc(&self.node.drm, self.profile, size)
    }

    /// Releases a shared buffer: unmaps it from this process and closes its
    /// handle, so the guest kernel destroys the resource (which unmaps it
    /// from the GPU VM first, section 6).
    pub fn free(&self, buf: SharedBuffer) {
        let SharedBuffer { bo, map } = buf;
        drop(map);
        self.node.drm.close(bo);
    }

    /// Removes whatever is bound in `[va, va + size)`.
    pub fn unbind(&mut self, va: u64, size: u64) -> Result<u64> {
        self.bind(&[BindOp::Unmap {
            va: GpuVa(va),
            size,
        }])
    }

    /// The render node (to `poll()` it for events without holding the
    /// session).
    pub fn drm(&self) -> Arc<Drm> {
        self.node.drm.clone()
    }

    /// Sends requests in one submission and waits for all their replies.
    pub fn call_many(&mut self, requests: &[Request<'_>]) -> Result<Vec<Reply>> {
        self.client.requests(requests)
    }

    /// Sends one request and returns its reply if its status is `OK`.
    pub fn call(&mut self, request: &Request<'_>) -> Result<Reply> {
        self.client.call(request)
    }

    /// Applies bind ops; returns the session's bound bytes.
    pub fn bind(&mut self, ops: &[BindOp<'_>]) -> Result<u64> {
        self.client.bind(ops).map(|b| b.bound_bytes)
    }

    /// Maps a shared buffer at `va`.
    pub fn map_buffer(&mut self, buf: &SharedBuffer, va: u64, perms: Perms) -> Result<u64> {
        self.bind(&[BindOp::MapResource {
            va: GpuVa(va),
            size: buf.map.len() as u64,
            perms,
            resource: buf.resource(),
            offset: 0,
        }])
    }

    /// Pins process memory and maps its pages at `gpu` (a userptr bind).
    pub fn map_host(&mut self, cpu: u64, gpu: u64, len: u64, perms: Perms) -> Result<u64> {
        memory::pin(cpu, len).map_err(|e| GuestError::io("pin", e))?;
        let pages = memory::frames(cpu, len).map_err(|e| GuestError::io("pagemap", e))?;
        let mut bound = 0;
        for (i, chunk) in pages.chunks(512).enumerate() {
            let va = GpuVa(gpu + i as u64 * 512 * PAGE_SIZE);
            bound = self.bind(&[BindOp::MapPages {
                va,
                perms,
                pages: PageList::new(chunk),
            }])?;
        }
        Ok(bound)
    }

    /// Sets range attributes.
    pub fn set_attrs(
        &mut self,
        va: u64,
        size: u64,
        attrs: guest_proto::attr::RangeAttrs,
    ) -> Result<()> {
        self.client.set_attrs(va, size, attrs)
    }

    /// Creates a queue.
    pub fn create_queue(&mut self) -> Result<QueueId> {
        self.client.create_queue(0)
    }

    /// Destroys a queue.
    pub fn destroy_queue(&mut self, queue: QueueId) -> Result<()> {
        self.client.destroy_queue(queue)
    }

    /// Queues `kernel` on `queue`, signalling `slot` with `value`.
    pub fn dispatch(
        &mut self,
        queue: QueueId,
        kernel: Kernel,
        slot: u32,
        value: u64,
    ) -> Result<()> {
        self.client.dispatch(Dispatch {
            queue,
            kernel,
            signal: Some(SignalIndex(slot)),
            notify: self.profile == ProfileKind::Native,
            completion_value: value,
        })
    }

    /// The signal slot as the device last wrote it.
    pub fn signal(&self, slot: u32) -> Result<SignalSlot> {
        self.client.signal(slot)
    }

    /// Waits until `slot` holds `value`, resolving faults meanwhile.
    pub fn wait_signal(&mut self, slot: u32, value: u64, timeout: Duration) -> Result<SignalSlot> {
        let (policy, ranges) = (self.policy, self.ranges.clone());
        self.client.wait_signal(slot, value, timeout, |client| {
            pump_faults(client, policy, &ranges).map(|n| n > 0)
        })
    }

    /// Runs a kernel on signal slot 0 and waits for it.
    pub fn run(&mut self, queue: QueueId, kernel: Kernel, timeout: Duration) -> Result<SignalSlot> {
        self.run_on(queue, kernel, 0, timeout)
    }

    /// Runs a kernel on signal slot `slot` and waits for it.
    pub fn run_on(
        &mut self,
        queue: QueueId,
        kernel: Kernel,
        slot: u32,
        timeout: Duration,
    ) -> Result<SignalSlot> {
        self.run_count = self.run_count.wrapping_add(1);
        let value = self.run_count << 8 | 1;
        self.dispatch(queue, kernel, slot, value)?;
        self.wait_signal(slot, value, timeout)
    }

    /// New fault records (consumed from the ring).
    pub fn take_faults(&mut self) -> Result<Vec<FaultRecord>> {
        self.client.take_faults()
    }

    /// Reads the fault ring and answers what it finds; returns how many
    /// records it handled.
    pub fn pump_faults(&mut self) -> Result<usize> {
        pump_faults(&mut self.client, self.policy, &self.ranges)
    }

    /// `DEVICE_QUERY` counters.
    pub fn query(&mut self) -> Result<DeviceQueryReply> {
        self.client.query()
    }

    /// Ends the session.
    pub fn destroy(mut self) -> Result<()> {
        self.client.destroy()
    }

    /// Native profile: submits `EVENT_ARM` on the event ring (ring 1). The
    /// device holds its fence until an event is pending (protocol 9); the
    /// DRM file becomes readable when it signals. Returns the submission's
    /// out-fence.
    pub fn arm_event(&mut self) -> Result<std::os::fd::OwnedFd> {
        if self.profile != ProfileKind::Native {
            return Err(GuestError::Invalid("EVENT_ARM needs the native profile"));
        }
        let arm = self.client.encode_no_reply(&[Request::EventArm])?;
        self.node
            .drm
            .execbuffer_fenced(&arm, Some(EVENT_RING))
            .map_err(|e| GuestError::io("EXECBUFFER (event ring)", e))
    }

    /// Native profile: a handle another thread can block on until the
    /// event fence signals (`poll()` on the DRM file).
    pub fn event_waiter(&self) -> EventWaiter {
        EventWaiter {
            drm: self.node.drm.clone(),
        }
    }

    /// Sends requests on ring 0 and returns the submission's out-fence
    /// without waiting for replies (native profile).
    pub fn submit_fenced(&mut self, requests: &[Request<'_>]) -> Result<std::os::fd::OwnedFd> {
        let (bytes, _) = self.client.encode(requests)?;
        let ring = (self.profile == ProfileKind::Native).then_some(0);
        self.node
            .drm
            .execbuffer_fenced(&bytes, ring)
            .map_err(|e| GuestError::io("EXECBUFFER", e))
    }
}

/// The event ring of the native profile.
const EVENT_RING: u32 = 1;

/// Blocks on the DRM file until a polled ring's fence signals (the event
/// fence of [`Session::arm_event`]).
#[derive(Debug, Clone)]
pub struct EventWaiter {
    drm: Arc<Drm>,
}

impl EventWaiter {
    /// Waits up to `timeout`; true if the event fence signalled (its DRM
    /// event is consumed).
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        self.drm
            .wait_event(ms)
            .map_err(|e| GuestError::io("poll DRM file", e))
    }
}

/// The user-space resolver: reads the fault ring and answers every record
/// by `policy`. Returns how many records it handled.
fn pump_faults<C: Channel>(
    client: &mut Client<C>,
    policy: ResolvePolicy,
    ranges: &[OwnedRange],
) -> Result<usize> {
    let faults = client.take_faults()?;
    if faults.is_empty() || policy == ResolvePolicy::Ignore {
        return Ok(faults.len());
    }
    for batch in faults.chunks(RESOLVE_BATCH) {
        resolve_batch(client, policy, ranges, batch)?;
    }
    Ok(faults.len())
}

fn resolve_batch<C: Channel>(
    client: &mut Client<C>,
    policy: ResolvePolicy,
    ranges: &[OwnedRange],
    faults: &[FaultRecord],
) -> Result<()> {
    let mut pages: Vec<(u64, Vec<GuestPhysAddr>, Perms)> = Vec::new();
    let mut answers = Vec::new();
    for f in faults {
        let resolved = match policy {
            ResolvePolicy::Resolve => resolve(ranges, f)?,
            ResolvePolicy::Process => match resolve(ranges, f)? {
                Some(p) => Some(p),
                None => resolve_process(f)?,
            },
            _ => None,
        };
        let outcome = match resolved {
            Some(p) => {
                pages.push(p);
                FaultOutcome::Resolved
            }
            None => FaultOutcome::Rejected,
        };
        answers.push(FaultReplyEntry {
            fault_id: f.fault_id,
            outcome,
        });
    }
    let ops: Vec<BindOp<'_>> = pages
        .iter()
        .map(|(va, p, perms)| BindOp::MapPages {
            va: GpuVa(*va),
            perms: *perms,
            pages: PageList::new(p),
        })
        .collect();
    let mut requests: Vec<Request<'_>> = ops
        .chunks(1)
        .map(|op| Request::VmBind(guest_proto::bind::VmBind::new(op)))
        .collect();
    requests.push(Request::FaultReply(guest_proto::fault::FaultReply::new(
        &answers,
    )));
    for r in client.requests(&requests)? {
        if r.status != Status::Ok && r.status != Status::UnknownFault {
            log::warn!(
                "resolver: {:#x} answered {}",
                r.payload.cmd(),
                r.status.name()
            );
        }
    }
    Ok(())
}

/// The pages to bind for a fault: the part of its granule that lies in
/// memory this process owns, pinned. `None`: not ours.
fn resolve(
    ranges: &[OwnedRange],
    f: &FaultRecord,
) -> Result<Option<(u64, Vec<GuestPhysAddr>, Perms)>> {
    let va = f.va.raw();
    let Some(range) = ranges.iter().find(|r| va >= r.gpu && va - r.gpu < r.len) else {
        return Ok(None);
    };
    let granule = 1u64 << f.granule_shift.clamp(12, 30);
    let start = (va & !(granule - 1)).max(range.gpu);
    let end = ((va | (granule - 1)) + 1).min(range.gpu + range.len);
    let cpu = range.cpu + (start - range.gpu);
    memory::pin(cpu, end - start).map_err(|e| GuestError::io("pin", e))?;
    let frames = memory::frames(cpu, end - start).map_err(|e| GuestError::io("pagemap", e))?;
    Ok(Some((start, frames, Perms::RW)))
}

/// The access a fault record needs (a prefetch: read).
fn needed_access(f: &FaultRecord) -> AccessFlags {
    match f.cause {
        FaultCause::Access { access, .. } => access,
        FaultCause::Prefetch => AccessFlags::READ,
    }
}

/// [`ResolvePolicy::Process`] for an address outside the owned ranges:
/// the granule clipped to the process mapping that holds the fault, if
/// that mapping grants the access; its pages are bound with the
/// mapping's own permissions (identity VA). `None`: not ours.
fn resolve_process(f: &FaultRecord) -> Result<Option<(u64, Vec<GuestPhysAddr>, Perms)>> {
    let va = f.va.raw();
    let Some(m) = procmaps::lookup(va).map_err(|e| GuestError::io("/proc/self/maps", e))? else {
        return Ok(None);
    };
    let access = needed_access(f);
    let writes = access.contains(AccessFlags::WRITE) || access.contains(AccessFlags::ATOMIC);
    if !m.fault_resolvable()
        || (writes && !m.write)
        || (access.contains(AccessFlags::EXEC) && !m.exec)
    {
        return Ok(None);
    }
    let granule = 1u64 << f.granule_shift.clamp(12, 30);
    let start = (va & !(granule - 1)).max(m.start);
    let end = ((va | (granule - 1)) + 1).min(m.end);
    memory::pin_range(start, end - start, m.write).map_err(|e| GuestError::io("pin", e))?;
    let frames = memory::frames(start, end - start).map_err(|e| GuestError::io("pagemap", e))?;
    let mut perms = Perms::READ;
    if m.write {
        perms = perms.union(Perms::WRITE);
    }
    if m.exec {
        perms = perms.union(Perms::EXEC);
    }
    Ok(Some((start, frames, perms)))
}

fn alloc(drm: &Drm, profile: ProfileKind, size: u64) -> Result<SharedBuffer> {
    let size = size.next_multiple_of(PAGE_SIZE);
    let bo = match profile {
        ProfileKind::Compat => {
            let s = u32::try_from(size).map_err(|_| GuestError::Invalid("buffer size"))?;
            drm.create_buffer(s)
        }
        ProfileKind::Native => drm.create_blob(size),
    }
    .map_err(|e| GuestError::io("create buffer", e))?;
    let len = usize::try_from(size).map_err(|_| GuestError::Invalid("buffer size"))?;
    let map = drm
        .map_offset(bo)
        .and_then(|offset| Mmap::shared(drm.fd(), offset, len))
        .map_err(|e| GuestError::io("mmap buffer", e))?;
    Ok(SharedBuffer { bo, map })
}

/// Whether a fault record is a prefetch.
pub fn is_prefetch(f: &FaultRecord) -> bool {
    matches!(f.cause, FaultCause::Prefetch)
}

/// The status of a finished dispatch, as an error if it failed.
pub fn dispatch_ok(slot: &SignalSlot) -> Result<()> {
    if slot.status == DispatchStatus::Ok {
        Ok(())
    } else {
        Err(GuestError::Dispatch(slot.status, slot.error_va))
    }
}

/// Fault ids of records.
pub fn ids(faults: &[FaultRecord]) -> Vec<FaultId> {
    faults.iter().map(|f| f.fault_id).collect()
}
