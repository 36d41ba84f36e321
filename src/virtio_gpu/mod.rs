//! The virtio-gpu device as a vhost-user backend.
//!
//! - [`protocol`]: the wire: `#[repr(C)]` structures, the numbers from
//!   `virtio_bindings`, requests decoded once into a [`protocol::GpuCommand`]
//!   and responses encoded once.
//! - [`error`]: [`error::GpuError`], why a command failed, and the
//!   `VIRTIO_GPU_RESP_ERR_*` it answers with.
//! - [`device`]: the command handlers (typed command in, typed response
//!   out).
//! - [`resources`]: resources and their guest backing.
//! - [`display`]: scanout, EDID and QEMU's GPU socket.
//! - [`fences`]: held fences and per-ring ordering.
//! - [`memory`]: the memory table, checked against its files.
//! - [`vring`]: the vring type, with the frontend's error eventfd.
//!
//! This module connects them to vhost-user-backend: two virtqueues
//! (control, cursor), the config space, a 1 ms timer that drives the compute
//! layer's time-based work (fault deadlines, deferred fault records) and
//! runs only while there is some, and an eventfd through which held fences
//! complete, and device events arrive, from any thread.
//!
//! # Spin-then-park
//! After an event the vring worker keeps polling the control queue's avail
//! ring and the fence inbox for a while before it goes back to epoll
//! (`poll_for_work`): while a guest is busy the next request or device
//! event usually comes within microseconds, and a parked worker costs a
//! wake-up of tens of them to reach. How long it polls adapts to the gaps
//! it sees ([`gpu_backend::poll`]): from zero for a guest that does little,
//! up to 100 us while requests and events come back to back. While it
//! polls, the driver is told not to kick (notification suppression, as a
//! real device does) and device threads skip the eventfd write; when it
//! stops, notifications are enabled and both are looked at once more, so
//! nothing that arrived meanwhile waits for a kick that never comes.

pub mod device;
pub mod display;
pub mod error;
pub mod fences;
pub mod memory;
pub mod protocol;
pub mod resources;
pub mod stats;
pub mod vring;

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::{
    VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{
    ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::context_backend::ContextBackendFactory;
use device::{GpuDevice, GpuLimits};
use fences::{Deferred, FenceInbox, RingQueues};
use gpu_backend::poll::PollBudget;
use protocol::{
    VIRTIO_GPU_F_CONTEXT_INIT, VIRTIO_GPU_F_EDID, VIRTIO_GPU_F_RESOURCE_BLOB, VIRTIO_GPU_F_VIRGL,
    VirtioGpuConfig,
};
use vring::GpuVring;

/// Control queue index.
const CONTROL_QUEUE: u16 = 0;
/// Cursor queue index.
const CURSOR_QUEUE: u16 = 1;
/// Virtqueues.
const NUM_QUEUES: usize = 2;
/// Largest queue: the split-ring maximum. crosvm offers the guest its
/// `max-queue-size` (default 32768) and Linux takes all of it; the rings live
/// in guest memory, so a large maximum costs the daemon nothing up front.
const QUEUE_SIZE: usize = 32768;
/// Device event of the tick timer (0..=NUM_QUEUES are the library's).
pub const TIMER_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Device event of held-fence completions.
pub const FENCE_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// Most request bytes read from one descriptor chain: a 1 MiB submit or
/// `max_backing_entries` memory entries, with headers.
const MAX_REQUEST_BYTES: usize = (4 << 20) + 64;
/// The request buffer kept between requests at most, a 1 MiB submit with
/// headers (a larger one is freed after use).
const MAX_KEPT_REQUEST_BYTES: usize = (1 << 20) + 4096;
/// How often the compute layer's time-based work runs (while it has some).
const TICK: Duration = Duration::from_millis(1);
/// The longest the worker polls in one go before it goes back to its
/// epoll loop, where the cursor queue and the exit event wait.
const MAX_POLL_RUN: Duration = Duration::from_millis(2);

/// The tick timer and whether it is armed.
struct Tick {
    fd: TimerFd,
    armed: bool,
}

/// The vring worker's polling state.
#[derive(Default)]
struct PollState {
    budget: PollBudget,
    /// When the last piece of work ended (the worker then polled for
    /// `budget` and parked).
    idle_since: Option<Instant>,
}

struct Inner {
    device: GpuDevice,
    rings: RingQueues,
    /// The device's memory, once a table was accepted.
    memory: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// Queues stopped after a ring error, until the frontend resets them.
    broken: [bool; NUM_QUEUES],
    /// The bytes of the request being processed (kept between requests:
    /// no allocation, no fresh pages, per request).
    request: Vec<u8>,
}

/// One connection's virtio-gpu device.
pub struct GpuVhostBackend {
    inner: Mutex<Inner>,
    inbox: Arc<FenceInbox>,
    timer: Mutex<Tick>,
    poll: Mutex<PollState>,
    exit: (EventConsumer, EventNotifier),
    event_idx: std::sync::atomic::AtomicBool,
    /// The control vring, once the worker has seen it (for `stop_vring`).
    control: Mutex<Option<GpuVring>>,
    /// Guest memory as the device sees it: checked tables only.
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl std::fmt::Debug for GpuVhostBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuVhostBackend").finish_non_exhaustive()
    }
}

impl GpuVhostBackend {
    /// A fresh device whose compute contexts come from `factory`.
    pub fn new(factory: &ContextBackendFactory, limits: GpuLimits) -> io::Result<GpuVhostBackend> {
        let inbox = FenceInbox::new()?;
        let compute = factory(inbox.clone());
        // Disarmed until the compute layer has time-based work; non-blocking,
        // so a tick that was disarmed after epoll reported it reads nothing
        // instead of blocking the worker.
        let timer = TimerFd::new()?;
        set_nonblocking(timer.as_raw_fd())?;
        Ok(GpuVhostBackend {
            inner: Mutex::new(Inner {
                device: GpuDevice::new(compute, limits),
                rings: RingQueues::default(),
                memory: None,
                broken: [false; NUM_QUEUES],
                request: Vec::new(),
            }),
            inbox,
            timer: Mutex::new(Tick {
                fd: timer,
                armed: false,
            }),
            poll: Mutex::new(PollState::default()),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            event_idx: std::sync::atomic::AtomicBool::new(false),
            control: Mutex::new(None),
            memory: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        })
    }

    /// The timer fd (registered with the vring epoll loop).
    pub fn timer_fd(&self) -> i32 {
        self.timer.lock().fd.as_raw_fd()
    }

    /// Whether the tick timer is armed (for tests).
    pub fn tick_armed(&self) -> bool {
        self.timer.lock().armed
    }

    /// Arms the tick timer while the compute layer has time-based work,
    /// disarms it otherwise: an idle guest costs no wake-ups.
    fn update_timer(&self) {
        let want = self.inner.lock().device.wants_tick();
        let mut t = self.timer.lock();
        if t.armed == want {
            return;
        }
        let r = if want {
            t.fd.reset(TICK, Some(TICK))
        } else {
            t.fd.clear()
        };
        match r {
            Ok(()) => t.armed = want,
            Err(e) => log::warn!("tick timer: {e}"),
        }
    }

    /// The held-fence completion fd (registered with the vring epoll loop).
    pub fn fence_fd(&self) -> i32 {
        self.inbox.fd()
    }

    /// The control queue's counters (for the metrics).
    pub fn counters(&self) -> Arc<stats::GpuCounters> {
        self.inner.lock().device.counters()
    }

    /// The connection ended: destroy every context.
    pub fn teardown(&self) {
        self.inner.lock().device.teardown();
    }

    fn config_space(&self) -> VirtioGpuConfig {
        VirtioGpuConfig {
            num_scanouts: 1.into(),
            num_capsets: self.inner.lock().device.num_capsets().into(),
            ..VirtioGpuConfig::default()
        }
    }

    /// Drains a queue. With EVENT_IDX the driver is told not to notify
    /// while we work, and we look again after re-enabling notifications.
    /// A ring error stops the queue (see [`vring`]); nothing here ends the
    /// vring worker.
    fn drain_queue(&self, q: u16, vring: &GpuVring) {
        let mut inner = self.inner.lock();
        if let Err(e) = self.drain_locked(&mut inner, q, vring) {
            inner.break_queue(q, vring, e);
        }
    }

    fn drain_locked(&self, inner: &mut Inner, q: u16, vring: &GpuVring) -> Result<(), RingError> {
        if inner.broken[usize::from(q)] {
            log::debug!(
                "{} queue: kick ignored, the queue is stopped",
                queue_name(q)
            );
            return Ok(());
        }
        let Some(mem) = inner.memory.clone() else {
            return Ok(());
        };
        let guard = mem.memory();
        if !self.event_idx.load(std::sync::atomic::Ordering::Relaxed) {
            return process_queue(inner, q, vring, &guard);
        }
        loop {
            vring
                .get_mut()
                .get_queue_mut()
                .disable_notification(&*guard)
                .map_err(RingError::Notification)?;
            process_queue(inner, q, vring, &guard)?;
            let more = vring
                .get_mut()
                .get_queue_mut()
                .enable_notification(&*guard)
                .map_err(RingError::Notification)?;
            if !more {
                return Ok(());
            }
        }
    }

    /// Whether the control queue has chains the device has not taken.
    /// Lock-free on the device's side (guest memory, the vring's read
    /// lock): called in the polling loop.
    fn control_has_work(&self, control: &GpuVring) -> bool {
        let mem = self.memory.memory();
        let state = control.get_ref();
        let queue = state.get_queue();
        queue.ready()
            && queue
                .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != queue.next_avail())
    }

    /// Processes the control queue's available chains without touching
    /// notification suppression (the polling loop does that).
    fn drain_polled(&self, control: &GpuVring) {
        let mut inner = self.inner.lock();
        if inner.broken[usize::from(CONTROL_QUEUE)] {
            return;
        }
        let Some(mem) = inner.memory.clone() else {
            return;
        };
        let guard = mem.memory();
        if let Err(e) = process_queue(&mut inner, CONTROL_QUEUE, control, &guard) {
            inner.break_queue(CONTROL_QUEUE, control, e);
        }
    }

    /// Turns the driver's notifications (kicks) for the control queue off
    /// or on; on: returns whether chains arrived meanwhile.
    fn control_notifications(&self, control: &GpuVring, enable: bool) -> bool {
        let inner = self.inner.lock();
        if inner.broken[usize::from(CONTROL_QUEUE)] {
            return false;
        }
        let Some(mem) = inner.memory.clone() else {
            return false;
        };
        let guard = mem.memory();
        let mut state = control.get_mut();
        let queue = state.get_queue_mut();
        if !queue.ready() {
            return false;
        }
        if enable {
            queue.enable_notification(&*guard).unwrap_or(true)
        } else {
            let _ = queue.disable_notification(&*guard);
            false
        }
    }

    /// Runs the compute layer's pending device events and returns the
    /// responses of completed fences.
    fn take_device_events(&self, control: &GpuVring) {
        self.inner.lock().device.tick();
        self.complete_fences(control);
    }

    /// Spin-then-park (see the module docs): polls the control queue and
    /// the inbox until nothing came for the adaptive budget (or for
    /// [`MAX_POLL_RUN`] in all), then leaves everything set up for the
    /// epoll loop to wake the worker again.
    fn poll_for_work(&self, control: &GpuVring) {
        let budget = self.poll.lock().budget.budget();
        let mut last = Instant::now();
        if !budget.is_zero() {
            let start = last;
            self.inbox.set_polling(true);
            self.control_notifications(control, false);
            let mut round = 0u32;
            loop {
                let mut worked = false;
                if self.control_has_work(control) {
                    self.drain_polled(control);
                    self.complete_fences(control);
                    worked = true;
                }
                if self.inbox.pending() {
                    self.take_device_events(control);
                    worked = true;
                }
                let now = Instant::now();
                if worked {
                    last = now;
                }
                if now.saturating_duration_since(last) >= budget
                    || now.saturating_duration_since(start) >= MAX_POLL_RUN
                {
                    break;
                }
                if !worked {
                    gpu_backend::poll::relax(&mut round);
                }
            }
            self.inbox.set_polling(false);
            if self.control_notifications(control, true) {
                self.drain_queue(CONTROL_QUEUE, control);
                self.complete_fences(control);
                last = Instant::now();
            }
            if self.inbox.pending() {
                self.take_device_events(control);
                last = Instant::now();
            }
        }
        self.poll.lock().idle_since = Some(last);
    }

    /// Returns the responses whose held fences completed.
    fn complete_fences(&self, vring: &GpuVring) {
        let done = self.inbox.take();
        if done.is_empty() {
            return;
        }
        let mut inner = self.inner.lock();
        let ready: Vec<Deferred> = done
            .into_iter()
            .flat_map(|f| inner.rings.complete(f))
            .collect();
        if ready.is_empty() || inner.broken[usize::from(CONTROL_QUEUE)] {
            return;
        }
        let Some(mem) = inner.memory.clone() else {
            return;
        };
        let guard = mem.memory();
        let result = ready.iter().try_for_each(|d| {
            vring
                .get_mut()
                .get_queue_mut()
                .add_used(&*guard, d.head, d.len)
                .map_err(RingError::UsedRing)
        });
        match result {
            Ok(()) => {
                let needed = vring
                    .get_mut()
                    .get_queue_mut()
                    .needs_notification(&*guard)
                    .unwrap_or(true);
                if needed {
                    signal(CONTROL_QUEUE, vring);
                }
            }
            Err(e) => inner.break_queue(CONTROL_QUEUE, vring, e),
        }
    }
}

/// Why a queue stopped: the driver (or the frontend's ring setup) broke the
/// ring, so the device cannot tell which descriptors are whose.
#[derive(Debug, thiserror::Error)]
enum RingError {
    /// The avail index is more than a queue's worth ahead of the next
    /// entry (or the ring cannot be read).
    #[error("avail ring: {0}")]
    AvailRing(virtio_queue::Error),
    /// An avail entry names a descriptor beyond the queue.
    #[error("avail entry names descriptor {head}, the queue has {size}")]
    HeadIndex {
        /// The head index the driver published.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// The used ring cannot be written.
    #[error("used ring: {0}")]
    UsedRing(virtio_queue::Error),
    /// The notification suppression fields cannot be accessed.
    #[error("event index: {0}")]
    Notification(virtio_queue::Error),
}

fn queue_name(q: u16) -> &'static str {
    if q == CONTROL_QUEUE {
        "control"
    } else {
        "cursor"
    }
}

fn signal(q: u16, vring: &GpuVring) {
    if let Err(e) = vring.signal_used_queue() {
        log::debug!("{} queue: notifying the driver: {e}", queue_name(q));
    }
}

impl Inner {
    /// Stops queue `q` after a ring error: logs it once, tells the frontend
    /// through the ring's error eventfd, and forgets the responses held for
    /// it (their descriptors cannot be returned on this ring any more).
    fn break_queue(&mut self, q: u16, vring: &GpuVring, error: RingError) {
        let Some(broken) = self.broken.get_mut(usize::from(q)) else {
            return;
        };
        if std::mem::replace(broken, true) {
            return;
        }
        log::error!(
            "{} queue: ring error: {error}; the queue is stopped until the frontend resets it",
            queue_name(q)
        );
        if q == CONTROL_QUEUE {
            self.rings = RingQueues::default();
        }
        if let Err(e) = vring.signal_error() {
            log::debug!(
                "{} queue: signalling the vring error eventfd: {e}",
                queue_name(q)
            );
        }
    }
}

/// Processes the available chains of queue `q`.
fn process_queue(
    inner: &mut Inner,
    q: u16,
    vring: &GpuVring,
    guard: &GuestMemoryLoadGuard<GuestMemoryMmap>,
) -> Result<(), RingError> {
    let cursor = q == CURSOR_QUEUE;
    let (chains, size) = {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let size = queue.size();
        match queue.iter(guard.clone()) {
            Ok(iter) => (iter.collect::<Vec<_>>(), size),
            // Not set up (or stopped) by the frontend: nothing to do.
            Err(virtio_queue::Error::QueueNotReady) => return Ok(()),
            Err(e) => return Err(RingError::AvailRing(e)),
        }
    };
    let mut used = false;
    let mut result = Ok(());
    for chain in chains {
        let head = chain.head_index();
        if head >= size {
            result = Err(RingError::HeadIndex { head, size });
            break;
        }
        let mut buf = std::mem::take(&mut inner.request);
        let (bytes, deferred) = if !read_request(guard, &chain, &mut buf) {
            (Vec::new(), None)
        } else if cursor {
            (inner.device.process_cursor(&buf), None)
        } else {
            let r = inner.device.process(&buf);
            let deferred = r.fence.map(|fence| (fence, r.held));
            (r.bytes, deferred)
        };
        // A larger request's buffer is not kept.
        if buf.capacity() <= MAX_KEPT_REQUEST_BYTES {
            inner.request = buf;
        }
        let len = write_response(guard, &chain, &bytes);
        let ready = match deferred {
            None => Some(head),
            Some((fence, held)) => inner
                .rings
                .submit(Deferred {
                    head,
                    len,
                    fence,
                    held,
                })
                .map(|d| d.head),
        };
        if let Some(head) = ready {
            let added = vring
                .get_mut()
                .get_queue_mut()
                .add_used(&**guard, head, len);
            if let Err(e) = added {
                result = Err(RingError::UsedRing(e));
                break;
            }
            used = true;
        }
    }
    if used {
        let needed = vring
            .get_mut()
            .get_queue_mut()
            .needs_notification(&**guard)
            .unwrap_or(true);
        if needed {
            signal(q, vring);
        }
    }
    result
}

/// Reads the readable part of a chain, bounded, into `buf`; false if the
/// chain cannot be read.
fn read_request<M>(mem: &M, chain: &virtio_queue::DescriptorChain<M>, buf: &mut Vec<u8>) -> bool
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let Ok(mut reader) = Reader::new(&**mem, chain.clone()) else {
        return false;
    };
    let n = reader.available_bytes().min(MAX_REQUEST_BYTES);
    buf.clear();
    buf.resize(n, 0);
    reader.read_exact(buf).is_ok()
}

/// Writes as much of `bytes` as the writable part of the chain takes.
fn write_response<M>(mem: &M, chain: &virtio_queue::DescriptorChain<M>, bytes: &[u8]) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let Ok(mut writer) = Writer::new(&**mem, chain.clone()) else {
        return 0;
    };
    let n = writer.available_bytes().min(bytes.len());
    match bytes.get(..n).map(|b| writer.write_all(b)) {
        Some(Ok(())) => u32::try_from(n).unwrap_or(0),
        _ => 0,
    }
}

impl VhostUserBackend for GpuVhostBackend {
    type Bitmap = ();
    type Vring = GpuVring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_F_RING_RESET)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_GPU_F_VIRGL)
            | (1 << VIRTIO_GPU_F_EDID)
            | (1 << VIRTIO_GPU_F_RESOURCE_BLOB)
            | (1 << VIRTIO_GPU_F_CONTEXT_INIT)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        log::info!("guest acked features {features:#x}");
        self.inner.lock().device.set_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        // vhost-user-backend has disabled every vring; the frontend sets
        // the device up again from scratch.
        let mut inner = self.inner.lock();
        inner.device.reset();
        inner.rings = RingQueues::default();
        inner.broken = [false; NUM_QUEUES];
        drop(inner);
        let _ = self.inbox.take();
        log::info!("device reset by the frontend");
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx
            .store(enabled, std::sync::atomic::Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = offset as usize;
        start
            .checked_add(size as usize)
            .and_then(|end| c.as_slice().get(start..end))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Only `events_clear` is writable, and no event is ever raised.
        Ok(())
    }

    fn update_memory(&self, shared: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // `shared` already holds the new table (and the vrings see it);
        // the device only ever uses `self.memory`, which takes checked
        // tables only (see [`memory`]).
        let table = (*shared.memory()).clone();
        if let Err(e) = memory::check_table(&table) {
            log::error!("memory table refused: {e}");
            drop(table);
            let good = (*self.memory.memory()).clone();
            match shared.lock() {
                Ok(guard) => guard.replace(good),
                Err(_) => log::error!("memory table refused, but the shared table is poisoned"),
            }
            return Err(io::Error::other(e));
        }
        let mut inner = self.inner.lock();
        match self.memory.lock() {
            Ok(guard) => guard.replace(table),
            Err(_) => return Err(io::Error::other("device memory lock poisoned")),
        }
        inner.device.set_memory(self.memory.clone());
        inner.memory = Some(self.memory.clone());
        Ok(())
    }

    fn set_gpu_socket(&self, socket: GpuBackend) -> io::Result<()> {
        self.inner.lock().device.display_mut().set_socket(socket);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // vhost-user-backend 0.24 turns the consumer into a raw fd for its
        // epoll set and never closes it: a fresh dup per connection leaked
        // one fd each time. It gets a non-owning alias of our consumer
        // instead, which is closed once, when this backend drops.
        let notifier = self.exit.1.try_clone().ok()?;
        // SAFETY: the fd is open and owned by `self.exit.0` for as long as
        // this backend lives. vhost-user-backend only calls `into_raw_fd`
        // on the alias (so the alias never closes it) and polls the raw fd
        // from its vring worker, whose handler holds an `Arc` of this
        // backend: the fd outlives every use. The 1,000-reconnect test
        // (tests/daemon_virtio.rs) checks the fd count stays flat.
        let consumer = unsafe { EventConsumer::from_raw_fd(self.exit.0.as_raw_fd()) };
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend stops the ring (guest reset, VM
        // stop). A stopped ring takes no more used entries: the responses
        // still held for it are returned now (their fences signal early; an
        // EVENT_ARM fence signals without an event, which the guest takes
        // as a spurious wake-up), and a ring stopped after an error starts
        // afresh.
        let Ok(q) = u16::try_from(queue_index) else {
            return Ok(());
        };
        let mut inner = self.inner.lock();
        let Some(broken) = inner.broken.get_mut(usize::from(q)) else {
            return Ok(());
        };
        let was_broken = std::mem::replace(broken, false);
        if q != CONTROL_QUEUE {
            return Ok(());
        }
        let held = std::mem::take(&mut inner.rings).drain();
        if was_broken || held.is_empty() {
            return Ok(());
        }
        let (Some(vring), Some(mem)) = (self.control.lock().clone(), inner.memory.clone()) else {
            return Ok(());
        };
        log::debug!(
            "control queue stopped: returning {} held responses",
            held.len()
        );
        let guard = mem.memory();
        let result = held.iter().try_for_each(|d| {
            vring
                .get_mut()
                .get_queue_mut()
                .add_used(&*guard, d.head, d.len)
                .map_err(RingError::UsedRing)
        });
        match result {
            Ok(()) => signal(CONTROL_QUEUE, &vring),
            Err(e) => log::warn!("control queue stopped: returning held responses: {e}"),
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[GpuVring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Nothing here returns an error: vhost-user-backend would end the
        // vring worker (both queues) for good.
        let Some(control) = vrings.get(usize::from(CONTROL_QUEUE)) else {
            log::error!("no control queue");
            return Ok(());
        };
        self.control.lock().get_or_insert_with(|| control.clone());
        if device_event != TIMER_EVENT {
            // Work came: how long after the last piece tunes the budget.
            let mut p = self.poll.lock();
            if let Some(since) = p.idle_since.take() {
                p.budget.observe(since.elapsed());
            }
        }
        match device_event {
            CONTROL_QUEUE => self.drain_queue(CONTROL_QUEUE, control),
            CURSOR_QUEUE => {
                if let Some(cursor) = vrings.get(usize::from(CURSOR_QUEUE)) {
                    self.drain_queue(CURSOR_QUEUE, cursor);
                }
            }
            TIMER_EVENT => {
                // Non-blocking: a tick disarmed after epoll saw it reads
                // nothing.
                let _ = self.timer.lock().fd.wait();
                self.inner.lock().device.tick();
            }
            // Held fences completed, or a context has device events (new
            // faults): forward them now instead of at the next tick.
            FENCE_EVENT => {
                self.inbox.clear_event();
                self.inner.lock().device.tick();
            }
            other => log::warn!("unexpected device event {other}"),
        }
        self.complete_fences(control);
        if device_event != TIMER_EVENT {
            self.poll_for_work(control);
        }
        self.update_timer();
        Ok(())
    }
}

/// Sets `O_NONBLOCK` on `fd`.
fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own; F_GETFL and F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
