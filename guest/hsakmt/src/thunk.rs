//! The thunk's process-wide state: one native-context session (one GPU VM
//! for this process, as KFD has one per process), the allocations and
//! registrations bound into it, the event page and doorbell page, user
//! queues, and the interrupt thread that plays the part of KFD's
//! interrupt handler: it resolves recoverable faults (XNACK), notices
//! stopped queues and raised events, and wakes waiters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_proto::attr::RangeAttrs;
use guest_proto::capset::Features;
use guest_proto::reply::DeviceQueryReply;
use guest_proto::{PAGE_SHIFT, PAGE_SIZE, Perms, Request};
use guest_runtime::client::Backoff;
use guest_runtime::drm::Drm;
use guest_runtime::mmap::Mmap;
use guest_runtime::session::{
    EVENT_RING, ProfileKind, RenderNode, ResolvePolicy, Session, SharedBuffer,
};

use crate::events::{EVENT_PAGE_BYTES, Events, UNSIGNALED};
use crate::queues::{QueueTable, UserQueue};
use crate::svm::{Change, SvmRanges};
use crate::topology::{self, GPU_NODE, Host, Topology};
use crate::types::*;

/// Bytes of the doorbell page: 512 eight-byte doorbells (ROCr indexes
/// its table by `(addr >> 3) & 0x3ff` inside one page).
pub const DOORBELL_PAGE_BYTES: u64 = 4096;

fn page_up(v: u64) -> Option<u64> {
    v.checked_add(PAGE_SIZE - 1).map(|x| x & !(PAGE_SIZE - 1))
}

/// What backs an allocation or registration.
#[derive(Debug)]
pub enum Backing {
    /// A device buffer (a virtio-gpu resource of guest memory), mapped
    /// into this process; bound at its CPU address when mapped to the GPU.
    Buffer(SharedBuffer),
    /// Address space only (`PROT_NONE`), never bound: scratch.
    Reserved(Mmap),
    /// Process memory the caller owns (a userptr registration): pinned and
    /// bound page by page when mapped to the GPU.
    User,
}

/// One allocation or registration.
#[derive(Debug)]
pub struct Alloc {
    /// CPU address = GPU VA (identity).
    pub addr: u64,
    /// Bytes the caller asked for.
    pub size: u64,
    /// Page-aligned start and length of what is bound when mapped.
    pub bind_start: u64,
    /// Page-aligned bound length.
    pub bind_len: u64,
    /// The node the caller named.
    pub node: u32,
    /// Its flags.
    pub flags: HsaMemFlags,
    /// Its backing.
    pub backing: Backing,
    /// Whether it is bound in the GPU VM.
    pub mapped: bool,
    /// `hsaKmtSetMemoryUserData`.
    pub user_data: usize,
}

impl Alloc {
    fn pointer_type(&self) -> HSA_POINTER_TYPE {
        match self.backing {
            Backing::User => HSA_POINTER_REGISTERED_USER,
            _ => HSA_POINTER_ALLOCATED,
        }
    }
}

/// Everything that goes through the session, under one lock.
#[derive(Debug)]
pub struct Dev {
    /// The session (this process's GPU VM).
    pub session: Session,
    /// Allocations and registrations by address.
    pub allocs: BTreeMap<u64, Alloc>,
    /// SVM attributes.
    pub svm: SvmRanges,
    /// The doorbell page (bound read-only into the VM: the device reads it).
    pub doorbells: SharedBuffer,
    /// User queues.
    pub queues: QueueTable,
    last_interrupts: u32,
}

/// Counters the thunk keeps itself (the device's are in `DEVICE_QUERY`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Fault records the interrupt thread handled.
    pub faults_handled: AtomicU64,
    /// Interrupts seen (changes of the ring's counter, summed).
    pub interrupts: AtomicU64,
    /// User queues alive.
    pub user_queues: std::sync::atomic::AtomicUsize,
}

/// The open thunk.
#[derive(Debug)]
pub struct Thunk {
    dev: Mutex<Dev>,
    /// Events and waiters.
    pub events: Events,
    /// The event page: mailbox slots the device writes event ids into.
    pub event_page: SharedBuffer,
    /// The topology snapshot.
    pub topology: Topology,
    /// The device offers protocol 1.1 user queues.
    pub user_queues: bool,
    /// The transport profile.
    pub profile: ProfileKind,
    /// The device's capset.
    pub capset: guest_proto::capset::Capset,
    /// Own counters.
    pub stats: Stats,
    drm: Arc<Drm>,
    stop: AtomicBool,
    irq: Mutex<Option<JoinHandle<()>>>,
}

/// An error of the thunk as a status.
pub fn status_of(e: &guest_runtime::GuestError) -> HsakmtStatus {
    use guest_proto::Status;
    match e.status() {
        Some(Status::Quota) => HSAKMT_STATUS_NO_MEMORY,
        Some(Status::OutOfRange | Status::Misaligned | Status::InvalidArgument) => {
            HSAKMT_STATUS_INVALID_PARAMETER
        }
        Some(Status::Unsupported) => HSAKMT_STATUS_NOT_SUPPORTED,
        Some(_) => HSAKMT_STATUS_ERROR,
        None => HSAKMT_STATUS_KERNEL_COMMUNICATION_ERROR,
    }
}

/// `?` for runtime results in the thunk.
pub trait OrStatus<T> {
    /// The value, or the error as a status (logged).
    fn or_status(self, what: &str) -> Result<T, HsakmtStatus>;
}

impl<T> OrStatus<T> for guest_runtime::Result<T> {
    fn or_status(self, what: &str) -> Result<T, HsakmtStatus> {
        self.map_err(|e| {
            crate::debug(|| format!("{what}: {e}"));
            status_of(&e)
        })
    }
}

impl Thunk {
    /// Opens the device, the session, the event and doorbell pages, and
    /// starts the interrupt thread.
    pub fn open() -> Result<Arc<Thunk>, HsakmtStatus> {
        let node = RenderNode::open().or_status("no device")?;
        let render_minor = node
            .path
            .to_str()
            .and_then(|p| p.strip_prefix("/dev/dri/renderD"))
            .and_then(|m| m.parse().ok())
            .unwrap_or(-1);
        let capset = node.capset;
        let profile = node.profile();
        let user_queues = crate::queues::device_has_user_queues(&capset);
        let mut session = Session::open(node).or_status("SESSION_INIT")?;
        session.set_policy(ResolvePolicy::Process);
        // KFD's default SVM granularity is 2 MiB: faults of unified memory
        // are resolved a granule at a time (section 5.6 GRANULARITY).
        if capset.features.contains(Features::RANGE_ATTRS) {
            let (start, end) = (capset.aperture_start.raw(), capset.aperture_end.raw());
            session
                .set_attrs(
                    start,
                    end - start,
                    RangeAttrs {
                        granule_shift: Some(
                            PAGE_SHIFT as u8 + crate::svm::DEFAULT_GRANULARITY as u8,
                        ),
                        ..RangeAttrs::default()
                    },
                )
                .or_status("RANGE_ATTR granularity")?;
        }
        let event_page = session.alloc(EVENT_PAGE_BYTES).or_status("event page")?;
        for slot in 0..EVENT_PAGE_BYTES as usize / 8 {
            event_page
                .map
                .store_u64(slot * 8, UNSIGNALED)
                .ok_or(HSAKMT_STATUS_ERROR)?;
        }
        session
            .map_buffer(&event_page, event_page.map.addr(), Perms::RW)
            .or_status("bind event page")?;
        let doorbells = session
            .alloc(DOORBELL_PAGE_BYTES)
            .or_status("doorbell page")?;
        session
            .map_buffer(&doorbells, doorbells.map.addr(), Perms::READ)
            .or_status("bind doorbell page")?;
        let drm = session.drm();
        let topology = topology::build(&capset, Host::this(), render_minor);
        let thunk = Arc::new(Thunk {
            dev: Mutex::new(Dev {
                session,
                allocs: BTreeMap::new(),
                svm: SvmRanges::default(),
                doorbells,
                queues: QueueTable::default(),
                last_interrupts: 0,
            }),
            events: Events::default(),
            event_page,
            topology,
            user_queues,
            profile,
            capset,
            stats: Stats::default(),
            drm,
            stop: AtomicBool::new(false),
            irq: Mutex::new(None),
        });
        let t = thunk.clone();
        let handle = std::thread::Builder::new()
            .name("hsakmt-irq".into())
            .spawn(move || t.irq_loop())
            .map_err(|_| HSAKMT_STATUS_OUT_OF_RESOURCES)?;
        *thunk.irq.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(thunk)
    }

    /// The device lock (a poisoned lock is taken over: a panic is caught
    /// at the FFI boundary and the device state stays consistent, since
    /// every request is complete or not sent).
    pub fn dev(&self) -> MutexGuard<'_, Dev> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the interrupt thread and ends the session.
    pub fn close(&self) {
        self.stop.store(true, Ordering::Release);
        self.events.notify();
        let handle = self.irq.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        if std::env::var_os("VGNC_HSAKMT_STATS").is_some() {
            if let Ok(q) = self.dev().session.query() {
                eprintln!("hsakmt: {}", format_counters(&q));
            }
            if let Ok(Some(u)) = self.queue_counters() {
                eprintln!(
                    "hsakmt: user queues: packets={} copy_bytes={} interrupts={} doorbell_polls={}",
                    u.user_queue_packets, u.copy_bytes, u.interrupts, u.doorbell_polls
                );
            }
        }
        let _ = self.dev().session.client().destroy();
    }

    /// The device's session counters.
    pub fn counters(&self) -> Result<DeviceQueryReply, HsakmtStatus> {
        self.dev().session.query().or_status("DEVICE_QUERY")
    }

    /// The device's user-queue counters (`QUEUE_COUNTERS`), `None` when
    /// the device has no user queues.
    pub fn queue_counters(
        &self,
    ) -> Result<Option<guest_proto::uq::QueueCountersReply>, HsakmtStatus> {
        if !self.user_queues {
            return Ok(None);
        }
        crate::protocol_ext::queue_counters(&mut self.dev().session).map(Some)
    }

    /// User queues alive (without taking the device lock).
    pub fn user_queue_count(&self) -> usize {
        self.stats.user_queues.load(Ordering::Relaxed)
    }

    /// Tells the device to look at the doorbells now (before a waiter
    /// blocks), when it has user queues.
    pub fn kick(&self) {
        if self.user_queues {
            let mut dev = self.dev();
            if !dev.queues.is_empty() {
                crate::queues::kick(&mut dev.session);
            }
        }
    }

    fn irq_loop(self: Arc<Thunk>) {
        let mut backoff = Backoff::default();
        let mut armed = false;
        while !self.stop.load(Ordering::Acquire) {
            let progressed = self.service();
            if progressed {
                backoff = Backoff::default();
                continue;
            }
            match self.profile {
                ProfileKind::Native => {
                    if !armed {
                        armed = self.arm();
                    }
                    // The held EVENT_ARM completes on faults and
                    // interrupts; the timeout only bounds how late a
                    // stop request is noticed.
                    match self.drm.wait_event(if armed { 50 } else { 5 }) {
                        Ok(true) => armed = false,
                        Ok(false) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
                ProfileKind::Compat => {
                    // Memory polling with back-off (3.1), never longer
                    // than 2 ms between looks while user queues exist.
                    // Without them the device only raises prefault
                    // records for this process: 20 ms is soon enough.
                    let mut pause = backoff.next_pause();
                    if pause >= Duration::from_millis(2) && self.user_queue_count() == 0 {
                        pause = Duration::from_millis(20);
                    }
                    if pause.is_zero() {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(pause);
                    }
                }
            }
        }
    }

    /// Native profile: holds an `EVENT_ARM` on the event ring (9).
    fn arm(&self) -> bool {
        let mut dev = self.dev();
        let client = dev.session.client();
        match client.encode_no_reply(&[Request::EventArm]) {
            Ok(bytes) => client.submit_raw(&bytes, Some(EVENT_RING)).is_ok(),
            Err(_) => false,
        }
    }

    /// One look at everything the device may have written: the fault
    /// ring (resolved at once), the interrupt counter, stopped queues and
    /// event mailboxes. Returns whether anything happened.
    fn service(&self) -> bool {
        let mut progressed = false;
        let mut stops = Vec::new();
        {
            let mut dev = self.dev();
            match dev.session.pump_faults() {
                Ok(n) if n > 0 => {
                    self.stats
                        .faults_handled
                        .fetch_add(n as u64, Ordering::Relaxed);
                    progressed = true;
                }
                Ok(_) => {}
                Err(e) => crate::debug(|| format!("fault ring: {e}")),
            }
            if let Ok(irq) = dev.session.client().interrupts() {
                if irq != dev.last_interrupts {
                    let delta = irq.wrapping_sub(dev.last_interrupts);
                    self.stats
                        .interrupts
                        .fetch_add(u64::from(delta), Ordering::Relaxed);
                    dev.last_interrupts = irq;
                    progressed = true;
                }
            }
            if self.user_queues {
                stops = dev.queues.take_stopped();
            }
        }
        let mut woke = false;
        for stop in stops {
            woke |= crate::queues::deliver_stop(self, &stop);
        }
        woke |= self.scan_mailboxes();
        if woke {
            self.events.notify();
        }
        progressed || woke
    }

    /// Signals every event whose mailbox the device wrote, and re-arms the
    /// mailbox (KFD does the same on each interrupt).
    fn scan_mailboxes(&self) -> bool {
        let mut table = self.events.lock();
        let mut any = false;
        for id in table.mailbox_ids() {
            let off = id as usize * 8;
            match self.event_page.map.load_u64(off) {
                Some(v) if v != UNSIGNALED => {
                    let _ = self.event_page.map.store_u64(off, UNSIGNALED);
                    any |= table.signal_id(id);
                }
                _ => {}
            }
        }
        any
    }

    // --- memory -------------------------------------------------------

    /// `hsaKmtAllocMemory`.
    pub fn alloc_memory(
        &self,
        node: u32,
        size: u64,
        flags: HsaMemFlags,
    ) -> Result<u64, HsakmtStatus> {
        if node > GPU_NODE {
            return Err(HSAKMT_STATUS_INVALID_NODE_UNIT);
        }
        let len = page_up(size)
            .filter(|l| *l > 0)
            .ok_or(HSAKMT_STATUS_INVALID_PARAMETER)?;
        let f = flags.Value;
        if f & mem_flags::FIXED_ADDRESS != 0 || f & mem_flags::GDS_MEMORY != 0 {
            return Err(HSAKMT_STATUS_NOT_SUPPORTED);
        }
        let mut dev = self.dev();
        let backing = if f & mem_flags::SCRATCH != 0 {
            let len = usize::try_from(len).map_err(|_| HSAKMT_STATUS_NO_MEMORY)?;
            Backing::Reserved(Mmap::reserve(len).map_err(|_| HSAKMT_STATUS_NO_MEMORY)?)
        } else {
            if len > self.capset.max_bound_bytes || len > u64::from(u32::MAX) + 1 - PAGE_SIZE {
                return Err(HSAKMT_STATUS_NO_MEMORY);
            }
            Backing::Buffer(dev.session.alloc(len).map_err(|e| {
                crate::debug(|| format!("alloc {len}: {e}"));
                HSAKMT_STATUS_NO_MEMORY
            })?)
        };
        let addr = match &backing {
            Backing::Buffer(b) => b.map.addr(),
            Backing::Reserved(m) => m.addr(),
            Backing::User => return Err(HSAKMT_STATUS_ERROR),
        };
        dev.allocs.insert(
            addr,
            Alloc {
                addr,
                size,
                bind_start: addr,
                bind_len: len,
                node,
                flags,
                backing,
                mapped: false,
                user_data: 0,
            },
        );
        Ok(addr)
    }

    /// `hsaKmtFreeMemory` (of an allocation) / `hsaKmtDeregisterMemory`
    /// (of a registration): unbinds what is bound, releases the backing.
    pub fn release(&self, addr: u64, registration: bool) -> Result<(), HsakmtStatus> {
        let mut dev = self.dev();
        let is_user = match dev.allocs.get(&addr) {
            Some(a) => matches!(a.backing, Backing::User),
            None if registration => return Err(HSAKMT_STATUS_MEMORY_NOT_REGISTERED),
            None => return Err(HSAKMT_STATUS_INVALID_PARAMETER),
        };
        if is_user != registration {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        let Some(a) = dev.allocs.remove(&addr) else {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        };
        if a.mapped {
            let _ = dev.session.unbind(a.bind_start, a.bind_len);
        }
        match a.backing {
            Backing::Buffer(b) => dev.session.free(b),
            Backing::Reserved(m) => drop(m),
            Backing::User => {
                guest_runtime::memory::unpin(a.bind_start, a.bind_len);
            }
        }
        Ok(())
    }

    /// `hsaKmtMapMemoryToGPU(Nodes)`: binds at the CPU address (identity).
    pub fn map(&self, addr: u64, read_only: bool) -> Result<u64, HsakmtStatus> {
        let mut dev = self.dev();
        let dev = &mut *dev;
        let a = lookup_mut(&mut dev.allocs, addr).ok_or(HSAKMT_STATUS_INVALID_PARAMETER)?;
        if a.mapped {
            return Ok(a.addr);
        }
        let ro = read_only || a.flags.Value & mem_flags::READ_ONLY != 0;
        let mut perms = if ro { Perms::READ } else { Perms::RW };
        if a.flags.Value & mem_flags::EXECUTE_ACCESS != 0 {
            perms = perms.union(Perms::EXEC);
        }
        match &a.backing {
            Backing::Buffer(b) => {
                dev.session
                    .map_buffer(b, a.bind_start, perms)
                    .or_status("VM_BIND")?;
            }
            Backing::Reserved(_) => {
                // Scratch is address space only; ROCr maps queue scratch
                // slices for kernels this device cannot run anyway.
                return Err(HSAKMT_STATUS_NOT_SUPPORTED);
            }
            Backing::User => {
                dev.session
                    .map_host(a.bind_start, a.bind_start, a.bind_len, perms)
                    .or_status("userptr VM_BIND")?;
            }
        }
        a.mapped = true;
        Ok(a.addr)
    }

    /// `hsaKmtUnmapMemoryToGPU`.
    pub fn unmap(&self, addr: u64) -> Result<(), HsakmtStatus> {
        let mut dev = self.dev();
        let dev = &mut *dev;
        let a = lookup_mut(&mut dev.allocs, addr).ok_or(HSAKMT_STATUS_INVALID_PARAMETER)?;
        if a.mapped {
            dev.session
                .unbind(a.bind_start, a.bind_len)
                .or_status("VM_BIND UNMAP")?;
            a.mapped = false;
        }
        Ok(())
    }

    /// `hsaKmtRegisterMemoryWithFlags`: records a userptr range; its pages
    /// are pinned and bound when it is mapped to the GPU.
    pub fn register(&self, addr: u64, size: u64, flags: HsaMemFlags) -> Result<(), HsakmtStatus> {
        if addr == 0 || size == 0 {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        let start = addr & !(PAGE_SIZE - 1);
        let end = addr
            .checked_add(size)
            .and_then(page_up)
            .ok_or(HSAKMT_STATUS_INVALID_PARAMETER)?;
        let mut dev = self.dev();
        if dev.allocs.contains_key(&addr) {
            return Err(HSAKMT_STATUS_MEMORY_ALREADY_REGISTERED);
        }
        // It must be this process's memory, readable, all of it.
        if !readable_range(start, end) {
            return Err(HSAKMT_STATUS_INVALID_PARAMETER);
        }
        dev.allocs.insert(
            addr,
            Alloc {
                addr,
                size,
                bind_start: start,
                bind_len: end - start,
                node: 0,
                flags,
                backing: Backing::User,
                mapped: false,
                user_data: 0,
            },
        );
        Ok(())
    }

    /// `hsaKmtQueryPointerInfo`.
    pub fn pointer_info(&self, ptr: u64) -> HsaPointerInfo {
        static MAPPED: [u32; 1] = [GPU_NODE];
        let dev = self.dev();
        let mut info = HsaPointerInfo {
            Type: HSA_POINTER_UNKNOWN,
            Node: 0,
            MemFlags: HsaMemFlags::default(),
            CPUAddress: std::ptr::null_mut(),
            GPUAddress: 0,
            SizeInBytes: 0,
            NRegisteredNodes: 0,
            NMappedNodes: 0,
            RegisteredNodes: std::ptr::null(),
            MappedNodes: std::ptr::null(),
            UserData: std::ptr::null_mut(),
        };
        if let Some(a) = lookup(&dev.allocs, ptr) {
            info.Type = a.pointer_type();
            info.Node = a.node;
            info.MemFlags = a.flags;
            info.CPUAddress = a.addr as *mut core::ffi::c_void;
            info.GPUAddress = a.addr;
            info.SizeInBytes = a.size;
            if a.mapped {
                info.NMappedNodes = 1;
                info.MappedNodes = MAPPED.as_ptr();
            }
            if matches!(a.backing, Backing::User) {
                info.NRegisteredNodes = 1;
                info.RegisteredNodes = MAPPED.as_ptr();
            }
            info.UserData = a.user_data as *mut core::ffi::c_void;
        }
        info
    }

    /// `hsaKmtSetMemoryUserData`.
    pub fn set_user_data(&self, ptr: u64, data: usize) -> Result<(), HsakmtStatus> {
        let mut dev = self.dev();
        let a = lookup_mut(&mut dev.allocs, ptr).ok_or(HSAKMT_STATUS_INVALID_PARAMETER)?;
        a.user_data = data;
        Ok(())
    }

    /// `hsaKmtSVMSetAttr`: stores the attributes and tells the device
    /// what concerns it (`RANGE_ATTR`).
    pub fn svm_set(
        &self,
        start: u64,
        size: u64,
        attrs: &[HSA_SVM_ATTRIBUTE],
    ) -> Result<(), HsakmtStatus> {
        let end = svm_range(start, size)?;
        let change = Change::parse(attrs)?;
        let mut dev = self.dev();
        dev.svm.set(start, end, &change)?;
        let mut q = [
            HSA_SVM_ATTRIBUTE {
                type_: HSA_SVM_ATTR_ACCESS,
                value: GPU_NODE,
            },
            HSA_SVM_ATTRIBUTE {
                type_: HSA_SVM_ATTR_SET_FLAGS,
                value: 0,
            },
        ];
        dev.svm.get(start, end, &mut q)?;
        let after = crate::svm::Attrs {
            access: match q[0].type_ {
                HSA_SVM_ATTR_NO_ACCESS => crate::svm::Access::None,
                HSA_SVM_ATTR_ACCESS_IN_PLACE => crate::svm::Access::InPlace,
                _ => crate::svm::Access::Access,
            },
            flags: q[1].value,
            ..crate::svm::Attrs::default()
        };
        let device = change.device_attrs(&after);
        // A device without RANGE_ATTRS keeps the attributes in the thunk
        // only (the real thunk on a GPU without SVM fails the call, but
        // then ROCr would not report the SVM capability we do).
        if device.count() > 0 && self.capset.features.contains(Features::RANGE_ATTRS) {
            dev.session
                .set_attrs(start, end - start, device)
                .or_status("RANGE_ATTR")?;
        }
        Ok(())
    }

    /// `hsaKmtSVMGetAttr`.
    pub fn svm_get(
        &self,
        start: u64,
        size: u64,
        attrs: &mut [HSA_SVM_ATTRIBUTE],
    ) -> Result<(), HsakmtStatus> {
        let end = svm_range(start, size)?;
        self.dev().svm.get(start, end, attrs)
    }
}

/// Whether `[start, end)` is covered, without holes, by readable mappings
/// of this process.
fn readable_range(start: u64, end: u64) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    covered(&guest_runtime::procmaps::parse(&text), start, end)
}

/// Whether `maps` (sorted, as the kernel lists them) cover `[start, end)`
/// with readable mappings.
pub fn covered(maps: &[guest_runtime::procmaps::MapEntry], start: u64, end: u64) -> bool {
    let mut at = start;
    for m in maps {
        if m.end <= at {
            continue;
        }
        if m.start > at || !m.read {
            return false;
        }
        at = m.end;
        if at >= end {
            return true;
        }
    }
    at >= end
}

fn svm_range(start: u64, size: u64) -> Result<u64, HsakmtStatus> {
    if !start.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) || size == 0 {
        return Err(HSAKMT_STATUS_INVALID_PARAMETER);
    }
    let end = start
        .checked_add(size)
        .ok_or(HSAKMT_STATUS_INVALID_PARAMETER)?;
    if end > 1 << 47 {
        return Err(HSAKMT_STATUS_INVALID_PARAMETER);
    }
    Ok(end)
}

/// The allocation containing `ptr`.
pub fn lookup(allocs: &BTreeMap<u64, Alloc>, ptr: u64) -> Option<&Alloc> {
    allocs
        .range(..=ptr)
        .next_back()
        .map(|(_, a)| a)
        .filter(|a| ptr < a.addr.saturating_add(a.size.max(1)))
}

fn lookup_mut(allocs: &mut BTreeMap<u64, Alloc>, ptr: u64) -> Option<&mut Alloc> {
    allocs
        .range_mut(..=ptr)
        .next_back()
        .map(|(_, a)| a)
        .filter(|a| ptr < a.addr.saturating_add(a.size.max(1)))
}

/// The device counters as one line (what `VGNC_HSAKMT_STATS` prints).
pub fn format_counters(q: &DeviceQueryReply) -> String {
    format!(
        "faults raised={} resolved={} rejected={} timed_out={} cancelled={} bound={}",
        q.faults_raised,
        q.faults_resolved,
        q.faults_rejected,
        q.faults_timed_out,
        q.faults_cancelled,
        q.bound_bytes
    )
}

/// For the queue module: the shared-buffer allocator and a handle on the
/// user queue record.
impl Dev {
    /// Inserts a user queue.
    pub fn add_queue(&mut self, q: UserQueue) -> u64 {
        self.queues.insert(q)
    }
}

/// `hsaKmtSetXNACKMode`: XNACK off makes every fault fatal (the device's
/// `FAULT_POLICY`); like KFD, refused while user queues exist.
pub fn set_xnack(t: &Thunk, on: bool) -> Result<(), HsakmtStatus> {
    let mut dev = t.dev();
    if !dev.queues.is_empty() {
        return Err(HSAKMT_STATUS_ERROR);
    }
    if !t.capset.features.contains(Features::RANGE_ATTRS) {
        return if on {
            Ok(())
        } else {
            Err(HSAKMT_STATUS_NOT_SUPPORTED)
        };
    }
    let (start, end) = (t.capset.aperture_start.raw(), t.capset.aperture_end.raw());
    let policy = if on {
        guest_proto::FaultPolicy::Recoverable
    } else {
        guest_proto::FaultPolicy::Fatal
    };
    dev.session
        .set_attrs(
            start,
            end - start,
            RangeAttrs {
                fault_policy: Some(policy),
                ..RangeAttrs::default()
            },
        )
        .or_status("RANGE_ATTR fault policy")
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_runtime::procmaps::parse;

    #[test]
    fn registrations_must_be_covered_by_readable_mappings() {
        let maps = parse(
            "10000-20000 rw-p 0 00:00 0\n20000-30000 r--p 0 00:00 0\n\
             30000-40000 ---p 0 00:00 0\n50000-60000 rw-p 0 00:00 0\n",
        );
        assert!(
            covered(&maps, 0x10000, 0x30000),
            "two adjacent readable mappings"
        );
        assert!(covered(&maps, 0x18000, 0x19000));
        assert!(!covered(&maps, 0x10000, 0x31000), "runs into PROT_NONE");
        assert!(!covered(&maps, 0x50000, 0x61000), "runs past the end");
        assert!(!covered(&maps, 0x40000, 0x41000), "a hole");
        assert!(!covered(&maps, 0x8000, 0x11000), "starts in a hole");
    }

    #[test]
    fn lookup_finds_the_allocation_containing_a_pointer() {
        let mut allocs = BTreeMap::new();
        for (addr, size) in [(0x10000u64, 0x3000u64), (0x20000, 0x1000)] {
            allocs.insert(
                addr,
                Alloc {
                    addr,
                    size,
                    bind_start: addr,
                    bind_len: size,
                    node: 0,
                    flags: HsaMemFlags::default(),
                    backing: Backing::User,
                    mapped: false,
                    user_data: 0,
                },
            );
        }
        assert_eq!(lookup(&allocs, 0x10000).map(|a| a.addr), Some(0x10000));
        assert_eq!(lookup(&allocs, 0x12fff).map(|a| a.addr), Some(0x10000));
        assert_eq!(
            lookup(&allocs, 0x13000).map(|a| a.addr),
            None,
            "one past the end"
        );
        assert_eq!(lookup(&allocs, 0x20800).map(|a| a.addr), Some(0x20000));
        assert_eq!(lookup(&allocs, 0xffff).map(|a| a.addr), None);
    }
}
