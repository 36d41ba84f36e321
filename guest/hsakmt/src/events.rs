//! Events the way KFD keeps them: ids, auto/manual reset, a signaled
//! state, and for signal events an 8-byte mailbox slot in the event page
//! (`HWData2`) that the device writes the event id into when it raises
//! the event (an SDMA FENCE, an AQL completion signal's mailbox). Waiters
//! block on a condition variable; the interrupt thread and `SetEvent`
//! wake them. Events are wake-ups only: ROCr re-reads its signal values.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::types::*;

/// Mailbox slots in the event page (KFD's `KFD_SIGNAL_EVENT_LIMIT`).
pub const EVENT_SLOTS: u32 = 4096;
/// Bytes of the event page.
pub const EVENT_PAGE_BYTES: u64 = EVENT_SLOTS as u64 * 8;
/// A mailbox nobody wrote (KFD's `UNSIGNALED_EVENT_SLOT`).
pub const UNSIGNALED: u64 = u64::MAX;

/// A fatal fault to deliver on MEMORY events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFault {
    /// The GPU node.
    pub node: u32,
    /// The faulting VA.
    pub va: u64,
    /// `HsaAccessAttributeFailure` bits.
    pub failure: u32,
}

#[derive(Debug)]
struct Event {
    ty: HSA_EVENTTYPE,
    auto_reset: bool,
    signaled: bool,
    /// The `HsaEvent` handed to the caller (owned by the table).
    handle: Box<HsaEvent>,
}

/// The table: every live event, by id and by handle address.
#[derive(Debug, Default)]
pub struct EventTable {
    events: HashMap<u32, Event>,
    by_handle: HashMap<usize, u32>,
    free_ids: Vec<u32>,
    next_id: u32,
    /// The fatal fault, once one happened (sticky, like a dead process).
    fault: Option<MemoryFault>,
}

impl std::fmt::Debug for HsaEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.EventId;
        f.debug_struct("HsaEvent")
            .field("EventId", &id)
            .finish_non_exhaustive()
    }
}

/// Why an event call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventError {
    /// Not an event of this table.
    BadHandle,
    /// No id left.
    Exhausted,
    /// A bad argument.
    Invalid,
    /// Timed out.
    Timeout,
}

impl EventError {
    /// The thunk status.
    pub fn status(self) -> HsakmtStatus {
        match self {
            EventError::BadHandle => HSAKMT_STATUS_INVALID_HANDLE,
            EventError::Exhausted => HSAKMT_STATUS_OUT_OF_RESOURCES,
            EventError::Invalid => HSAKMT_STATUS_INVALID_PARAMETER,
            EventError::Timeout => HSAKMT_STATUS_WAIT_TIMEOUT,
        }
    }
}

/// Signal and debug events are the only ones user space may set.
fn user_settable(ty: HSA_EVENTTYPE) -> bool {
    ty == HSA_EVENTTYPE_SIGNAL || ty == HSA_EVENTTYPE_DEBUG_EVENT
}

impl EventTable {
    /// Creates an event; `mailbox_base` is the event page's address (its
    /// slot `id` becomes `HWData2` for signal events). Returns the handle.
    pub fn create(
        &mut self,
        desc: &HsaEventDescriptor,
        manual_reset: bool,
        signaled: bool,
        mailbox_base: u64,
    ) -> Result<*mut HsaEvent, EventError> {
        let ty = desc.EventType;
        if ty >= HSA_EVENTTYPE_MAXID {
            return Err(EventError::Invalid);
        }
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None => {
                // Ids 1 .. EVENT_SLOTS - 1: id = mailbox slot.
                if self.next_id == 0 {
                    self.next_id = 1;
                }
                if self.next_id >= EVENT_SLOTS {
                    return Err(EventError::Exhausted);
                }
                self.next_id += 1;
                self.next_id - 1
            }
        };
        let sync = desc.SyncVar;
        let mut data = HsaEventData {
            EventType: ty,
            EventData: HsaEventDataUnion { Raw: [0; 5] },
            HWData1: u64::from(id),
            HWData2: 0,
            HWData3: id,
        };
        if ty == HSA_EVENTTYPE_MEMORY {
            data.EventData.MemoryAccessFault = HsaMemoryAccessFault::default();
        } else {
            data.EventData.SyncVar = sync;
        }
        if user_settable(ty) {
            data.HWData2 = mailbox_base + u64::from(id) * 8;
        }
        let mut handle = Box::new(HsaEvent {
            EventId: id,
            EventData: data,
        });
        let ptr: *mut HsaEvent = &mut *handle;
        self.by_handle.insert(ptr as usize, id);
        self.events.insert(
            id,
            Event {
                ty,
                auto_reset: !manual_reset,
                signaled: signaled && user_settable(ty),
                handle,
            },
        );
        Ok(ptr)
    }

    /// The id of a handle the table gave out.
    pub fn id_of(&self, handle: *const HsaEvent) -> Result<u32, EventError> {
        self.by_handle
            .get(&(handle as usize))
            .copied()
            .ok_or(EventError::BadHandle)
    }

    /// Destroys an event (its handle is freed).
    pub fn destroy(&mut self, handle: *const HsaEvent) -> Result<(), EventError> {
        let id = self.id_of(handle)?;
        self.by_handle.remove(&(handle as usize));
        self.events.remove(&id);
        self.free_ids.push(id);
        Ok(())
    }

    /// `SetEvent` / `ResetEvent` of a signal event.
    pub fn set(&mut self, handle: *const HsaEvent, on: bool) -> Result<(), EventError> {
        let id = self.id_of(handle)?;
        let e = self.events.get_mut(&id).ok_or(EventError::BadHandle)?;
        if !user_settable(e.ty) {
            return Err(EventError::Invalid);
        }
        e.signaled = on;
        Ok(())
    }

    /// Ids of events with a mailbox, for the interrupt thread's scan.
    pub fn mailbox_ids(&self) -> Vec<u32> {
        self.events
            .iter()
            .filter(|(_, e)| user_settable(e.ty))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Signals event `id` (an interrupt for it arrived); false if gone.
    pub fn signal_id(&mut self, id: u32) -> bool {
        match self.events.get_mut(&id) {
            Some(e) => {
                e.signaled = true;
                true
            }
            None => false,
        }
    }

    /// A fatal memory fault: every MEMORY event becomes signaled and
    /// carries it from now on.
    pub fn memory_fault(&mut self, fault: MemoryFault) {
        if self.fault.is_none() {
            self.fault = Some(fault);
        }
        for e in self.events.values_mut() {
            if e.ty == HSA_EVENTTYPE_MEMORY {
                e.signaled = true;
            }
        }
    }

    /// The fatal fault, if one happened.
    pub fn fault(&self) -> Option<MemoryFault> {
        self.fault
    }

    /// If the wait on `ids` is satisfied, consumes it: auto-reset events
    /// that were signaled are reset, MEMORY events get the fault written
    /// into their `HsaEvent` the way the real thunk fills it after
    /// `AMDKFD_IOC_WAIT_EVENTS`.
    pub fn try_consume(&mut self, ids: &[u32], all: bool) -> bool {
        let signaled = |t: &EventTable, id: &u32| t.events.get(id).is_some_and(|e| e.signaled);
        let done = if all {
            ids.iter().all(|id| signaled(self, id))
        } else {
            ids.iter().any(|id| signaled(self, id))
        };
        if !done {
            return false;
        }
        let fault = self.fault;
        for id in ids {
            let Some(e) = self.events.get_mut(id) else {
                continue;
            };
            if !e.signaled {
                continue;
            }
            if e.ty == HSA_EVENTTYPE_MEMORY {
                if let Some(f) = fault {
                    e.handle.EventData.EventData.MemoryAccessFault = HsaMemoryAccessFault {
                        NodeId: f.node,
                        VirtualAddress: f.va,
                        Failure: f.failure,
                        Flags: HSA_EVENTID_MEMORY_FATAL_PROCESS,
                    };
                }
            }
            if e.auto_reset {
                e.signaled = false;
            }
        }
        true
    }

    /// Live events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event lives.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// The table and the waiters' condition variable.
#[derive(Debug, Default)]
pub struct Events {
    table: Mutex<EventTable>,
    wake: Condvar,
}

impl Events {
    /// Locks the table (a poisoned lock is taken over: the table has no
    /// invariant a panic could break half way).
    pub fn lock(&self) -> MutexGuard<'_, EventTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiter.
    pub fn notify(&self) {
        self.wake.notify_all();
    }

    /// Waits until `handles` are signaled (any, or all), `timeout_ms`
    /// (`u32::MAX`: forever). `before_block` runs once before the first
    /// sleep (the thunk kicks doorbells there).
    pub fn wait(
        &self,
        handles: &[*const HsaEvent],
        all: bool,
        timeout_ms: u32,
        before_block: impl FnOnce(),
    ) -> Result<(), EventError> {
        let deadline = (timeout_ms != u32::MAX)
            .then(|| Instant::now() + Duration::from_millis(timeout_ms.into()));
        let mut t = self.lock();
        let ids = handles
            .iter()
            .map(|h| t.id_of(*h))
            .collect::<Result<Vec<u32>, _>>()?;
        if t.try_consume(&ids, all) {
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(EventError::Timeout);
        }
        drop(t);
        before_block();
        t = self.lock();
        loop {
            if t.try_consume(&ids, all) {
                return Ok(());
            }
            let slice = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(EventError::Timeout);
                    }
                    (d - now).min(Duration::from_millis(100))
                }
                None => Duration::from_millis(100),
            };
            t = self
                .wake
                .wait_timeout(t, slice)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            // A destroyed event ends the wait with an error.
            if ids.iter().any(|id| !t.events.contains_key(id)) {
                return Err(EventError::BadHandle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn desc(ty: HSA_EVENTTYPE) -> HsaEventDescriptor {
        HsaEventDescriptor {
            EventType: ty,
            NodeId: 0,
            SyncVar: HsaSyncVar::default(),
        }
    }

    #[test]
    fn signal_events_get_a_mailbox_slot_memory_events_do_not() {
        let mut t = EventTable::default();
        let a = t
            .create(&desc(HSA_EVENTTYPE_SIGNAL), false, false, 0x10_0000)
            .unwrap();
        let m = t
            .create(&desc(HSA_EVENTTYPE_MEMORY), true, false, 0x10_0000)
            .unwrap();
        // SAFETY: handles the table owns, alive until destroyed.
        let (a_ev, m_ev) = unsafe { (*a, *m) };
        let id = a_ev.EventId;
        assert_eq!(id, 1);
        assert_eq!({ a_ev.EventData.HWData2 }, 0x10_0000 + 8);
        assert_eq!({ m_ev.EventData.HWData2 }, 0);
        assert_eq!(t.mailbox_ids(), vec![1]);
        assert_eq!(
            t.set(m, true),
            Err(EventError::Invalid),
            "system events are not settable"
        );
        assert_eq!(
            t.create(&desc(HSA_EVENTTYPE_MAXID), false, false, 0).err(),
            Some(EventError::Invalid)
        );
        t.destroy(a).unwrap();
        assert_eq!(t.destroy(a), Err(EventError::BadHandle), "double destroy");
        assert_eq!(
            t.id_of(0x1234 as *const HsaEvent),
            Err(EventError::BadHandle)
        );
    }

    #[test]
    fn auto_reset_events_reset_when_a_wait_consumes_them() {
        let mut t = EventTable::default();
        let a = t
            .create(&desc(HSA_EVENTTYPE_SIGNAL), false, true, 0)
            .unwrap();
        let m = t
            .create(&desc(HSA_EVENTTYPE_SIGNAL), true, false, 0)
            .unwrap();
        let (ia, im) = (t.id_of(a).unwrap(), t.id_of(m).unwrap());
        assert!(t.try_consume(&[ia], false), "created signaled");
        assert!(!t.try_consume(&[ia], false), "auto reset");
        t.set(m, true).unwrap();
        assert!(t.try_consume(&[im], false));
        assert!(t.try_consume(&[im], false), "manual reset stays signaled");
        assert!(!t.try_consume(&[ia, im], true), "all: a is not signaled");
        assert!(t.signal_id(ia));
        assert!(t.try_consume(&[ia, im], true));
    }

    #[test]
    fn a_memory_fault_is_written_into_memory_events() {
        let mut t = EventTable::default();
        let m = t
            .create(&desc(HSA_EVENTTYPE_MEMORY), true, false, 0)
            .unwrap();
        let id = t.id_of(m).unwrap();
        assert!(!t.try_consume(&[id], false));
        t.memory_fault(MemoryFault {
            node: 1,
            va: 0xdead_0000,
            failure: failure::NOT_PRESENT,
        });
        assert!(t.try_consume(&[id], false));
        // SAFETY: a live handle of the table.
        let f = unsafe { (*m).EventData.EventData.MemoryAccessFault };
        assert_eq!(
            ({ f.NodeId }, { f.VirtualAddress }, { f.Failure }, {
                f.Flags
            }),
            (
                1,
                0xdead_0000,
                failure::NOT_PRESENT,
                HSA_EVENTID_MEMORY_FATAL_PROCESS
            )
        );
    }

    #[test]
    fn waiters_wake_on_set_and_time_out_otherwise() {
        let ev = Arc::new(Events::default());
        let h = ev
            .lock()
            .create(&desc(HSA_EVENTTYPE_SIGNAL), false, false, 0)
            .unwrap() as usize;
        let start = Instant::now();
        assert_eq!(
            ev.wait(&[h as *const HsaEvent], false, 30, || ()),
            Err(EventError::Timeout)
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
        let ev2 = ev.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            ev2.lock().set(h as *const HsaEvent, true).unwrap();
            ev2.notify();
        });
        let mut kicked = false;
        ev.wait(&[h as *const HsaEvent], false, u32::MAX, || kicked = true)
            .unwrap();
        assert!(kicked, "the doorbell kick runs before blocking");
        setter.join().unwrap();
    }
}
