//! Fences whose response waits: per-ring, strictly in order.
//!
//! virtio-gpu signals a fence by returning the command that carried it.
//! Linux expects the fences of one timeline (one ring of one context) to
//! signal in order, so a command whose fence the compute layer holds blocks
//! every later fenced command on the same ring until it completes. Commands
//! without a ring index (the compat profile's single global timeline) are
//! never held and never wait.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::context_backend::{CtxId, FenceCompleter, FenceRef};

/// A used-ring entry waiting for its turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deferred {
    /// Descriptor head.
    pub head: u16,
    /// Bytes written.
    pub len: u32,
    /// The fence.
    pub fence: FenceRef,
    /// Still held by the compute layer.
    pub held: bool,
}

/// The per-ring queues of deferred responses.
#[derive(Debug, Default)]
pub struct RingQueues {
    rings: BTreeMap<(CtxId, u8), VecDeque<Deferred>>,
}

impl RingQueues {
    /// A fenced response on `fence`'s ring. Returns it back if it may be
    /// returned right away (not held, nothing ahead of it).
    pub fn submit(&mut self, d: Deferred) -> Option<Deferred> {
        let Some(ring) = d.fence.ring_idx else {
            return (!d.held).then_some(d);
        };
        let q = self.rings.entry((d.fence.ctx, ring)).or_default();
        if q.is_empty() && !d.held {
            return Some(d);
        }
        q.push_back(d);
        None
    }

    /// The compute layer completed `fence`: returns the responses that may
    /// now go back, in order.
    pub fn complete(&mut self, fence: FenceRef) -> Vec<Deferred> {
        let Some(ring) = fence.ring_idx else {
            return Vec::new();
        };
        let Some(q) = self.rings.get_mut(&(fence.ctx, ring)) else {
            return Vec::new();
        };
        if let Some(d) = q.iter_mut().find(|d| d.fence == fence) {
            d.held = false;
        }
        let mut out = Vec::new();
        while q.front().is_some_and(|d| !d.held) {
            out.extend(q.pop_front());
        }
        if q.is_empty() {
            self.rings.remove(&(fence.ctx, ring));
        }
        out
    }

    /// Every deferred response, held or not, ring by ring in order.
    pub fn drain(self) -> Vec<Deferred> {
        self.rings.into_values().flatten().collect()
    }
}

/// Completions from the compute layer, from any thread, waking the queue
/// worker through an eventfd.
///
/// While the worker polls (spin-then-park, see the module `poll` of the
/// virtio-gpu layer) it looks at [`FenceInbox::pending`] itself, and
/// producers skip the eventfd write: the flags are a Dekker pair (each
/// side stores its own, then loads the other's, sequentially consistent),
/// so either the worker still sees `pending` after it stopped polling, or
/// the producer sees it stopped and writes the eventfd.
#[derive(Debug)]
pub struct FenceInbox {
    done: Mutex<Vec<FenceRef>>,
    event: EventFd,
    /// Something arrived since the last [`FenceInbox::take`].
    pending: AtomicBool,
    /// The worker is polling: no eventfd write needed.
    polling: AtomicBool,
}

impl FenceInbox {
    /// A new inbox.
    pub fn new() -> std::io::Result<Arc<FenceInbox>> {
        Ok(Arc::new(FenceInbox {
            done: Mutex::new(Vec::new()),
            event: EventFd::new(EFD_NONBLOCK)?,
            pending: AtomicBool::new(false),
            polling: AtomicBool::new(false),
        }))
    }

    /// The fd the worker polls.
    pub fn fd(&self) -> i32 {
        self.event.as_raw_fd()
    }

    /// Consumes the eventfd's count (the worker does when it fired).
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// Whether completions or device events arrived since the last
    /// [`FenceInbox::take`].
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// The worker starts (`true`) or stops polling the inbox.
    pub fn set_polling(&self, polling: bool) {
        self.polling.store(polling, Ordering::SeqCst);
    }

    /// Takes the completions so far.
    pub fn take(&self) -> Vec<FenceRef> {
        // Cleared before the list is taken: whatever comes after sets it
        // again.
        if !self.pending.swap(false, Ordering::SeqCst) {
            return Vec::new();
        }
        std::mem::take(&mut *self.done.lock())
    }

    fn notify(&self) {
        self.pending.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            let _ = self.event.write(1);
        }
    }
}

impl FenceCompleter for FenceInbox {
    fn complete(&self, fence: FenceRef) {
        self.done.lock().push(fence);
        self.notify();
    }

    fn wake(&self) {
        self.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: u64, ring: Option<u8>, held: bool) -> Deferred {
        Deferred {
            head: id as u16,
            len: 24,
            fence: FenceRef {
                ctx: CtxId(1),
                fence_id: id,
                ring_idx: ring,
            },
            held,
        }
    }

    #[test]
    fn a_held_fence_blocks_its_ring_only() {
        let mut q = RingQueues::default();
        assert_eq!(q.submit(d(1, Some(1), true)), None);
        assert_eq!(q.submit(d(2, Some(1), false)), None, "behind the held one");
        assert_eq!(q.submit(d(3, Some(0), false)), Some(d(3, Some(0), false)));
        assert_eq!(q.submit(d(4, None, false)), Some(d(4, None, false)));
        let out = q.complete(d(1, Some(1), true).fence);
        assert_eq!(out.iter().map(|x| x.head).collect::<Vec<_>>(), vec![1, 2]);
        assert!(q.complete(d(1, Some(1), true).fence).is_empty());
    }

    #[test]
    fn a_polling_worker_gets_no_eventfd_write_and_loses_nothing() {
        let inbox = FenceInbox::new().unwrap();
        let fence = d(1, Some(1), true).fence;
        assert!(!inbox.pending());
        assert!(inbox.take().is_empty());
        inbox.set_polling(true);
        inbox.complete(fence);
        assert!(inbox.pending());
        assert!(
            inbox.event.read().is_err(),
            "no eventfd write while polling"
        );
        assert_eq!(inbox.take(), vec![fence]);
        assert!(!inbox.pending());
        inbox.set_polling(false);
        inbox.wake();
        assert_eq!(
            inbox.event.read().unwrap(),
            1,
            "parked: the eventfd wakes it"
        );
        assert!(inbox.pending());
        assert!(inbox.take().is_empty(), "a wake carries no fence");
        assert!(!inbox.pending());
    }
}
