//! The vring type the device runs on: vhost-user-backend's `VringRwLock`,
//! plus the frontend's error eventfd.
//!
//! `VHOST_USER_SET_VRING_ERR` gives the backend an eventfd to signal "this
//! ring is broken"; `VringRwLock` stores it but offers no way to use it, so
//! this wrapper keeps it itself. Everything else is delegated.
//!
//! A broken ring (the driver published a head index beyond the queue, moved
//! the avail index more than a queue's worth ahead, or the frontend set a
//! base that does so) is what a real device answers with
//! `VIRTIO_CONFIG_S_NEEDS_RESET`. Over vhost-user the device status belongs
//! to the frontend: the backend cannot set that bit, and vhost 0.18's
//! backend request channel cannot send a config-change message either (and
//! virtio-gpu's config space has no field that would say "reset"). So the
//! device does what the transport allows: it signals this eventfd (QEMU
//! sets one up for every vhost queue; its handler only reports the error in
//! debug builds), logs once, and refuses the queue until the frontend stops
//! it (`GET_VRING_BASE`) or resets the device (`RESET_DEVICE`).

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;

use parking_lot::Mutex;
use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as QueueError;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// A vring and its error eventfd.
#[derive(Clone)]
pub struct GpuVring {
    vring: VringRwLock,
    err: Arc<Mutex<Option<File>>>,
}

impl std::fmt::Debug for GpuVring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuVring")
            .field("err", &self.err.lock().is_some())
            .finish_non_exhaustive()
    }
}

impl GpuVring {
    /// Tells the frontend the ring is broken, if it gave an error eventfd.
    pub fn signal_error(&self) -> io::Result<()> {
        match self.err.lock().as_mut() {
            Some(file) => file.write_all(&1u64.to_ne_bytes()),
            None => Ok(()),
        }
    }
}

impl<'a> VringStateGuard<'a, Mem> for GpuVring {
    type G = <VringRwLock as VringStateGuard<'a, Mem>>::G;
}

impl<'a> VringStateMutGuard<'a, Mem> for GpuVring {
    type G = <VringRwLock as VringStateMutGuard<'a, Mem>>::G;
}

impl VringT<Mem> for GpuVring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, QueueError> {
        Ok(GpuVring {
            vring: VringRwLock::new(mem, max_queue_size)?,
            err: Arc::new(Mutex::new(None)),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.vring.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.vring.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.vring.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.vring.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.vring.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.vring.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.vring.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.vring.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), QueueError> {
        self.vring.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.vring.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.vring.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.vring.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.vring.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.vring.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.vring.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.vring.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.vring.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.vring.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.vring.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        *self.err.lock() = file;
    }
}
