//! A native-context session from the guest side: discovery, the session's
//! shared memory, requests and replies, queues, signals and the fault
//! resolver (docs/protocol.md sections 3, 5, 7, 8, 9).
//!
//! Who resolves the faults ([`Resolver`]): the guest kernel when its
//! virtio-gpu driver has the SVM uAPI and the device `KERNEL_SVM`
//! ([`crate::svm`], docs/guest-kernel.md), else this process's user-space
//! resolver (pinned pages, [`crate::memory`]). The API is the same: owned
//! ranges, the whole-process policy, userptr binds and prefetches go to
//! `REGISTER`/`PREFETCH` on the kernel path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_proto::bind::{BindOp, PageList};
use guest_proto::capset::{CAPSET_MAX_VERSION, CAPSET_SIZE, Capset, Features, VGNC_CAPSET_ID};
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
use crate::svm::{KernelSvm, SvmStats};
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
    /// `VIRTGPU_PARAM_SVM`: the driver can resolve faults itself.
    pub svm: bool,
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
        let svm = crate::svm::available(&drm);
        Ok(RenderNode {
            drm: Arc::new(drm),
            path,
            capset,
            virgl,
            context_init,
            blob,
            svm,
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

    /// Whether the guest kernel can resolve the faults: the driver has the
    /// SVM uAPI and the device offers `KERNEL_SVM` (protocol 1.1).
    pub fn kernel_svm(&self) -> bool {
        self.svm && self.capset.features.contains(Features::KERNEL_SVM)
    }
}

/// Who resolves a session's faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolver {
    /// The guest kernel: HMM and MMU notifiers, nothing pinned, every
    /// invalidation unbound from the device (the primary path).
    Kernel,
    /// This process: pinned pages and `/proc/self/pagemap` (the fallback
    /// for stock guest kernels; nothing tells the device when the guest
    /// kernel takes those pages back).
    User,
}

/// Which resolver [`Session::open_with`] sets up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolverChoice {
    /// The kernel's when the driver and the device offer it, else the
    /// user-space one.
    Auto,
    /// The user-space one, even on a kernel with SVM (for comparisons and
    /// for the user resolver's own tests). [`Session::use_kernel_resolver`]
    /// can still switch such a session to the kernel later (another
    /// process holding the file, for instance).
    User,
    /// The kernel's, or an error.
    Kernel,
}

impl ResolverChoice {
    /// `NC_RESOLVER=auto|user|kernel` (unset or anything else: auto).
    pub fn from_env() -> ResolverChoice {
        match std::env::var("NC_RESOLVER").as_deref() {
            Ok("user") => ResolverChoice::User,
            Ok("kernel") => ResolverChoice::Kernel,
            _ => ResolverChoice::Auto,
        }
    }
}

/// What the user-space resolver did: records answered and the time from
/// reading each record to the device's answer to its `FAULT_REPLY`
/// (summed), the figure the kernel's `fault-ns` counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolverStats {
    /// Fault records answered.
    pub faults: u64,
    /// Record read to answer acknowledged, summed, in ns.
    pub ns: u64,
}

/// A range the kernel mirrors for this session: `[cpu, cpu + len)` at
/// `gpu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Registration {
    cpu: u64,
    gpu: u64,
    len: u64,
    /// A userptr bind's (unregistered by [`Session::unbind`]).
    userptr: bool,
}

impl Registration {
    fn contains_cpu(&self, cpu: u64, len: u64) -> bool {
        cpu >= self.cpu && cpu.saturating_add(len) <= self.cpu + self.len
    }

    fn gpu_to_cpu(&self, gpu: u64, len: u64) -> Option<u64> {
        (gpu >= self.gpu && gpu.saturating_add(len) <= self.gpu + self.len)
            .then(|| self.cpu + (gpu - self.gpu))
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

/// A session of one render-node file and its fault resolver (the guest
/// kernel's, or this process's).
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
    /// The kernel path, once `ENABLE` succeeded.
    kernel: Option<KernelSvm>,
    registrations: Vec<Registration>,
    user_stats: ResolverStats,
}

fn enotty_or_eopnotsupp(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EOPNOTSUPP))
}

impl Session {
    /// Opens a session on `node` with its profile and the resolver
    /// `NC_RESOLVER` asks for ([`ResolverChoice::from_env`]; by default
    /// the kernel's when there is one).
    pub fn open(node: RenderNode) -> Result<Session> {
        Self::open_with(node, ResolverChoice::from_env())
    }

    /// Opens a session on `node` with its profile and `choice` of resolver.
    pub fn open_with(node: RenderNode, choice: ResolverChoice) -> Result<Session> {
        let mut s = Self::open_user(node)?;
        match choice {
            ResolverChoice::User => {}
            ResolverChoice::Auto => {
                s.use_kernel_resolver()?;
            }
            ResolverChoice::Kernel => {
                if !s.use_kernel_resolver()? {
                    return Err(GuestError::Invalid(
                        "kernel resolver (no SVM uAPI in the driver or no KERNEL_SVM in the device)",
                    ));
                }
            }
        }
        Ok(s)
    }

    fn open_user(node: RenderNode) -> Result<Session> {
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
            ProfileKind::Native => (
                Some(0),
                Profile::Native {
                    event_ring: EVENT_RING,
                },
            ),
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
            kernel: None,
            registrations: Vec::new(),
            user_stats: ResolverStats::default(),
        })
    }

    /// Hands the session's faults to the guest kernel (`ENABLE`) if the
    /// driver and the device can: true if the kernel resolves them from
    /// now on, false if this stays the user-space resolver (a stock
    /// kernel: `ENOTTY`; a device without `KERNEL_SVM`: `EOPNOTSUPP`).
    /// Ranges owned so far are registered with the kernel.
    ///
    /// Once enabled, the driver refuses this file's own `MAP_PAGES` and
    /// `FAULT_REPLY` for good, so the user-space resolver cannot come back.
    pub fn use_kernel_resolver(&mut self) -> Result<bool> {
        if self.kernel.is_some() {
            return Ok(true);
        }
        if !self.node.kernel_svm() {
            return Ok(false);
        }
        let svm = KernelSvm::new(self.node.drm.clone());
        match svm.enable(0) {
            Ok(()) => {}
            Err(e) if enotty_or_eopnotsupp(&e) => {
                log::info!("kernel resolver unavailable ({e}): user-space resolver");
                return Ok(false);
            }
            Err(e) => return Err(GuestError::io("SVM ENABLE", e)),
        }
        self.kernel = Some(svm);
        for range in self.ranges.clone() {
            self.register_owned(range)?;
        }
        if self.policy == ResolvePolicy::Process {
            self.register_process()?;
        }
        Ok(true)
    }

    /// Who resolves this session's faults.
    pub fn resolver(&self) -> Resolver {
        if self.kernel.is_some() {
            Resolver::Kernel
        } else {
            Resolver::User
        }
    }

    /// The kernel resolver's counters (fdinfo), on the kernel path.
    pub fn kernel_stats(&self) -> Option<SvmStats> {
        self.kernel.as_ref().and_then(|k| k.stats().ok())
    }

    /// The user-space resolver's counters.
    pub fn user_stats(&self) -> ResolverStats {
        self.user_stats
    }

    /// Registers `[cpu, cpu + len)` at `gpu` with the kernel.
    fn register(
        &mut self,
        cpu: u64,
        gpu: u64,
        len: u64,
        perms: Perms,
        userptr: bool,
    ) -> Result<()> {
        let Some(k) = &self.kernel else {
            return Ok(());
        };
        k.register(cpu, len, gpu, perms, 0)
            .map_err(|e| GuestError::io("SVM REGISTER", e))?;
        self.registrations.push(Registration {
            cpu,
            gpu,
            len,
            userptr,
        });
        Ok(())
    }

    /// The registration of identity-mapped `[cpu, cpu + len)`, if one
    /// covers it.
    fn covering(&self, cpu: u64, gpu: u64, len: u64) -> Option<Registration> {
        self.registrations
            .iter()
            .find(|r| r.contains_cpu(cpu, len) && r.gpu_to_cpu(gpu, len) == Some(cpu))
            .copied()
    }

    fn register_owned(&mut self, r: OwnedRange) -> Result<()> {
        if self.covering(r.cpu, r.gpu, r.len).is_some() {
            return Ok(());
        }
        self.register(r.cpu, r.gpu, r.len, Perms::RW, false)
    }

    /// The whole-process policy on the kernel path: registers the
    /// process's address space ([`crate::svm::process_ranges`]) minus what
    /// is registered already. Idempotent; a later call also covers
    /// mappings made since, if they fell outside.
    pub fn register_process(&mut self) -> Result<()> {
        if self.kernel.is_none() {
            return Ok(());
        }
        let text = std::fs::read_to_string("/proc/self/maps")
            .map_err(|e| GuestError::io("/proc/self/maps", e))?;
        let floor = self.node.capset.aperture_start.raw();
        for (start, end) in crate::svm::process_ranges(&procmaps::parse(&text), floor) {
            // The parts no registration covers yet.
            let mut taken: Vec<(u64, u64)> = self
                .registrations
                .iter()
                .map(|r| (r.cpu, r.cpu + r.len))
                .filter(|(s, e)| *s < end && start < *e)
                .collect();
            taken.sort_unstable();
            let mut at = start;
            for (s, e) in taken.into_iter().chain(std::iter::once((end, end))) {
                if s > at {
                    match self.register(at, at, s - at, Perms::ALL, false) {
                        Ok(()) => {}
                        Err(e) => log::warn!("whole process: {at:#x}..{s:#x} not registered: {e}"),
                    }
                }
                at = at.max(e);
            }
        }
        Ok(())
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

    /// Sets what the resolver does. On the kernel path `Process`
    /// registers the process's address space with the kernel;
    /// `RejectAll` and `Ignore` exist for the user-space resolver only
    /// (the kernel resolves what is registered), so a session that tests
    /// them opens with [`ResolverChoice::User`].
    pub fn set_policy(&mut self, policy: ResolvePolicy) {
        self.policy = policy;
        if self.kernel.is_none() {
            return;
        }
        match policy {
            ResolvePolicy::Process => {
                if let Err(e) = self.register_process() {
                    log::warn!("whole-process registration: {e}");
                }
            }
            ResolvePolicy::RejectAll | ResolvePolicy::Ignore => {
                log::warn!("{policy:?} has no effect: the guest kernel resolves the faults");
            }
            ResolvePolicy::Resolve => {}
        }
    }

    /// Lets the resolver bind `range` on faults: on the kernel path the
    /// kernel mirrors it (`REGISTER`).
    pub fn own(&mut self, range: OwnedRange) -> Result<()> {
        self.ranges.push(range);
        if self.kernel.is_some() {
            self.register_owned(range)?;
        }
        Ok(())
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

    /// Removes whatever is bound in `[va, va + size)`; a userptr bind the
    /// kernel mirrors is unregistered (unbound before the call returns).
    pub fn unbind(&mut self, va: u64, size: u64) -> Result<u64> {
        let userptr = self
            .registrations
            .iter()
            .position(|r| r.userptr && r.gpu == va && r.len == size);
        if let (Some(i), Some(k)) = (userptr, &self.kernel) {
            let r = self.registrations.remove(i);
            k.unregister(r.cpu, r.len)
                .map_err(|e| GuestError::io("SVM UNREGISTER", e))?;
            return self.query().map(|q| q.bound_bytes);
        }
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

    /// Maps process memory at `gpu` (a userptr bind): on the kernel path
    /// the kernel mirrors it (`REGISTER`, unless a registration covers it
    /// already) and binds it now (`PREFETCH`), unpinned; on the user path
    /// it is pinned and its frames bound.
    pub fn map_host(&mut self, cpu: u64, gpu: u64, len: u64, perms: Perms) -> Result<u64> {
        if self.kernel.is_some() {
            if self.covering(cpu, gpu, len).is_none() {
                self.register(cpu, gpu, len, perms, true)?;
            }
            if let Some(k) = &self.kernel {
                k.prefetch(cpu, len)
                    .map_err(|e| GuestError::io("SVM PREFETCH", e))?;
            }
            return self.query().map(|q| q.bound_bytes);
        }
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

    /// Sets range attributes. On the kernel path a `PREFAULT` of a range
    /// the kernel mirrors is the kernel's `PREFETCH` (bound when this
    /// returns) instead of prefault records.
    pub fn set_attrs(
        &mut self,
        va: u64,
        size: u64,
        attrs: guest_proto::attr::RangeAttrs,
    ) -> Result<()> {
        let mirrored = self
            .registrations
            .iter()
            .find_map(|r| r.gpu_to_cpu(va, size));
        if let (Some(cpu), Some(true), Some(k)) = (mirrored, attrs.prefault, &self.kernel) {
            let k = k.clone();
            let rest = guest_proto::attr::RangeAttrs {
                prefault: None,
                ..attrs
            };
            if rest.count() > 0 {
                self.client.set_attrs(va, size, rest)?;
            }
            return k
                .prefetch(cpu, size)
                .map_err(|e| GuestError::io("SVM PREFETCH", e));
        }
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

    /// Waits until `slot` holds `value`, resolving faults meanwhile (on
    /// the user path; on the kernel path the kernel does, and this only
    /// waits).
    pub fn wait_signal(&mut self, slot: u32, value: u64, timeout: Duration) -> Result<SignalSlot> {
        if self.kernel.is_some() {
            return self.client.wait_signal(slot, value, timeout, |_| Ok(false));
        }
        let (policy, ranges) = (self.policy, self.ranges.clone());
        let stats = &mut self.user_stats;
        self.client.wait_signal(slot, value, timeout, |client| {
            pump_faults(client, policy, &ranges, stats).map(|n| n > 0)
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

    /// The user-space resolver: reads the fault ring and answers what it
    /// finds; returns how many records it handled. On the kernel path
    /// there is nothing to do (the kernel owns the faults): 0.
    pub fn pump_faults(&mut self) -> Result<usize> {
        if self.kernel.is_some() {
            return Ok(0);
        }
        pump_faults(
            &mut self.client,
            self.policy,
            &self.ranges,
            &mut self.user_stats,
        )
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
pub const EVENT_RING: u32 = 1;

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
    stats: &mut ResolverStats,
) -> Result<usize> {
    let faults = client.take_faults()?;
    if faults.is_empty() || policy == ResolvePolicy::Ignore {
        return Ok(faults.len());
    }
    let read = Instant::now();
    for batch in faults.chunks(RESOLVE_BATCH) {
        resolve_batch(client, policy, ranges, batch)?;
        // Every record of the batch was read at `read` and is answered now.
        let ns = u64::try_from(read.elapsed().as_nanos()).unwrap_or(u64::MAX);
        stats.faults += batch.len() as u64;
        stats.ns = stats
            .ns
            .saturating_add(ns.saturating_mul(batch.len() as u64));
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

/// The access a fault record needs (a prefault: read).
fn needed_access(f: &FaultRecord) -> AccessFlags {
    match f.cause {
        FaultCause::Access { access, .. } => access,
        FaultCause::Prefault => AccessFlags::READ,
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

/// Whether a fault record is a prefault (no work waits on it).
pub fn is_prefault(f: &FaultRecord) -> bool {
    matches!(f.cause, FaultCause::Prefault)
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
