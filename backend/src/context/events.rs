//! The context's inbox for device events.
//!
//! Device threads report faults and finished dispatches here and return at
//! once: they never wait for the thread that drives the context (which may
//! itself be waiting for the device, in an unmap's shootdown). The driving
//! thread drains the inbox in [`ComputeContext::pump`](super::ComputeContext::pump).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use guest_proto::{DispatchStatus, QueueId};
use parking_lot::Mutex;

use super::NOTIFY_TAG;
use crate::device::{DeviceFault, Interrupt, VmEvents};

/// How many `DispatchStatus` values there are (0 ..= 6, protocol 7).
pub const DISPATCH_STATUSES: usize = 7;

/// Wakes the thread that drives a context (for example by writing an
/// eventfd); called from device threads.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Events a device VM reported and the context has not taken yet.
pub(crate) struct EventInbox {
    faults: Mutex<Vec<DeviceFault>>,
    dispatches_done: AtomicU64,
    /// Dispatches that ended, by `DispatchStatus` value.
    ended_by_status: [AtomicU64; DISPATCH_STATUSES],
    notify: AtomicBool,
    /// Interrupts raised so far (protocol 14.7).
    interrupts: AtomicU64,
    waker: Option<Waker>,
}

impl EventInbox {
    pub(crate) fn new(waker: Option<Waker>) -> EventInbox {
        EventInbox {
            faults: Mutex::new(Vec::new()),
            dispatches_done: AtomicU64::new(0),
            ended_by_status: Default::default(),
            notify: AtomicBool::new(false),
            interrupts: AtomicU64::new(0),
            waker,
        }
    }

    /// Takes the faults reported so far, in order.
    pub(crate) fn take_faults(&self) -> Vec<DeviceFault> {
        std::mem::take(&mut *self.faults.lock())
    }

    /// Whether faults wait to be taken.
    pub(crate) fn has_faults(&self) -> bool {
        !self.faults.lock().is_empty()
    }

    pub(crate) fn take_notify(&self) -> bool {
        self.notify.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn interrupts(&self) -> u64 {
        self.interrupts.load(Ordering::Acquire)
    }

    pub(crate) fn dispatches_done(&self) -> u64 {
        self.dispatches_done.load(Ordering::Acquire)
    }

    /// Dispatches that ended so far, by `DispatchStatus` value.
    pub(crate) fn dispatches_by_status(&self) -> [u64; DISPATCH_STATUSES] {
        let mut out = [0u64; DISPATCH_STATUSES];
        for (o, c) in out.iter_mut().zip(self.ended_by_status.iter()) {
            *o = c.load(Ordering::Relaxed);
        }
        out
    }

    fn wake(&self) {
        if let Some(waker) = &self.waker {
            waker();
        }
    }
}

impl VmEvents for EventInbox {
    fn faults(&self, batch: &[DeviceFault]) {
        // Bounded: the device keeps at most `max_pending_faults` faults
        // pending, and reports each once.
        self.faults.lock().extend_from_slice(batch);
        self.wake();
    }

    fn dispatch_done(&self, _queue: QueueId, tag: u64, status: DispatchStatus) {
        self.dispatches_done.fetch_add(1, Ordering::AcqRel);
        if let Some(c) = self.ended_by_status.get(status as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if tag & NOTIFY_TAG != 0 {
            self.notify.store(true, Ordering::Release);
            // A NOTIFY dispatch's end is an interrupt too (14.7).
            self.interrupts.fetch_add(1, Ordering::AcqRel);
            // Only then has the driving thread something to do (an event
            // fence to complete): the end of any other dispatch is in its
            // signal, which the device wrote already.
            self.wake();
        }
    }

    fn interrupt(&self, irq: Interrupt) {
        log::trace!("interrupt {irq:?}");
        self.interrupts.fetch_add(1, Ordering::AcqRel);
        self.wake();
    }
}
