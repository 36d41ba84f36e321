//! Fault forwarding: from device faults to guest-visible fault records.
//!
//! A device reports faults per page; the guest resolves them per *granule*
//! (the `GRANULARITY` range attribute), the way amdgpu's
//! `svm_range_restore_pages` migrates a whole range for one retry fault.
//! The tracker therefore coalesces every device fault that hits a granule
//! with a pending guest fault into that one guest fault, and ends all of
//! them together when the guest answers.
//!
//! The guest's fault ring is finite and the guest may be slow. A guest fault
//! that does not fit waits in a backlog, oldest first, and is written when
//! the guest has consumed records: nothing is lost (protocol 8.2). Every
//! guest fault has a deadline counted from when it was raised; a guest that
//! never answers only stalls (and then fails) its own work.
//!
//! The tracker is pure bookkeeping: it decides which device faults end how,
//! and the caller tells the device.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use guest_proto::fault::{FaultCause, FaultRecord as WireRecord};
use guest_proto::{AccessFlags, FaultId, GpuVa, QueueId};

use crate::device::DeviceFault;
use crate::histogram::LatencyHistogram;

/// Where guest-visible fault records go: the session's fault ring in guest
/// memory.
pub trait FaultRing {
    /// Writes `record` if the ring has room and returns true; returns false
    /// (after counting the miss in the ring's `dropped` field) if it is full.
    fn push(&mut self, record: &WireRecord) -> bool;
}

/// Fault counters of a context, as `DEVICE_QUERY` reports them. They count
/// guest faults (one per record, however many device faults merged into
/// it), and always add up: `raised` = `resolved` + `rejected` +
/// `timed_out` + `cancelled` + the faults still pending.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    /// Guest faults raised (prefault records included), whether their
    /// record is in the ring yet or still waits for room: a fault can end
    /// (time out, be cancelled) before its record was ever written.
    pub raised: u64,
    /// Guest faults answered `RESOLVED`.
    pub resolved: u64,
    /// Guest faults answered `REJECTED`.
    pub rejected: u64,
    /// Guest faults that ran past their deadline.
    pub timed_out: u64,
    /// Guest faults ended by teardown.
    pub cancelled: u64,
}

/// A guest fault waiting for its answer.
#[derive(Debug)]
struct PendingFault {
    record: WireRecord,
    /// The device faults that end with this guest fault.
    device_faults: Vec<FaultId>,
    granule: Granule,
    raised_at: Instant,
    written: bool,
}

/// A fault granule: its first byte and its size as a power of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Granule {
    base: u64,
    shift: u8,
}

impl Granule {
    fn of(va: GpuVa, shift: u8) -> Granule {
        let mask = 1u64
            .checked_shl(u32::from(shift))
            .map_or(u64::MAX, |g| g - 1);
        Granule {
            base: va.raw() & !mask,
            shift,
        }
    }
}

/// How the guest answered a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestAnswer {
    /// The memory is bound: replay.
    Resolved,
    /// Not the guest's to give: fail the work.
    Rejected,
}

/// The guest-visible faults of one context.
#[derive(Debug)]
pub struct FaultTracker {
    next_id: u64,
    pending: HashMap<FaultId, PendingFault>,
    by_granule: HashMap<Granule, FaultId>,
    backlog: VecDeque<FaultId>,
    max_pending: usize,
    timeout: Duration,
    counters: FaultCounters,
    /// From raise to answer, of the faults the guest answered.
    round_trip: LatencyHistogram,
}

impl FaultTracker {
    /// A tracker holding at most `max_pending` guest faults, each answered
    /// within `timeout`.
    pub fn new(max_pending: u32, timeout: Duration) -> FaultTracker {
        FaultTracker {
            next_id: 1,
            pending: HashMap::new(),
            by_granule: HashMap::new(),
            backlog: VecDeque::new(),
            max_pending: usize::try_from(max_pending).unwrap_or(usize::MAX),
            timeout,
            counters: FaultCounters::default(),
            round_trip: LatencyHistogram::default(),
        }
    }

    /// How long the guest took to answer, from raise to answer, for every
    /// fault it answered (`RESOLVED` or `REJECTED`).
    pub fn round_trips(&self) -> &LatencyHistogram {
        &self.round_trip
    }

    /// The counters.
    pub fn counters(&self) -> FaultCounters {
        self.counters
    }

    /// Guest faults pending (written or waiting for room in the ring).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Guest faults waiting for room in the ring.
    pub fn deferred(&self) -> usize {
        self.backlog.len()
    }

    /// Takes a device fault to forward, in a granule of `1 << granule_shift`
    /// bytes. It joins the pending guest fault of its granule if there is
    /// one, else it starts a new one.
    pub fn add_device_fault(&mut self, fault: &DeviceFault, granule_shift: u8, now: Instant) {
        let granule = Granule::of(fault.va, granule_shift);
        if let Some(id) = self.by_granule.get(&granule).copied() {
            if let Some(pending) = self.pending.get_mut(&id) {
                pending.device_faults.push(fault.id);
                if !pending.written {
                    merge_access(&mut pending.record, fault.access, fault.merged);
                }
                return;
            }
        }
        let record = WireRecord {
            fault_id: self.take_id(),
            va: fault.va,
            granule_shift,
            cause: FaultCause::Access {
                queue: fault.queue,
                access: fault.access,
                merged: fault.merged.max(1),
            },
        };
        self.insert(record, vec![fault.id], granule, now);
        self.by_granule.insert(granule, record.fault_id);
    }

    /// Queues a prefault record for the granule of `va` (the record names
    /// `va`'s page, the first unbound one); false when the
    /// pending cap is reached or the granule already has a pending fault.
    pub fn add_prefault(&mut self, va: GpuVa, granule_shift: u8, now: Instant) -> bool {
        let granule = Granule::of(va, granule_shift);
        if self.pending.len() >= self.max_pending || self.by_granule.contains_key(&granule) {
            return false;
        }
        let record = WireRecord {
            fault_id: self.take_id(),
            va: va.page_down(),
            granule_shift,
            cause: FaultCause::Prefault,
        };
        self.insert(record, Vec::new(), granule, now);
        true
    }

    /// Whether more prefault records may be queued.
    pub fn has_room(&self) -> bool {
        self.pending.len() < self.max_pending
    }

    fn take_id(&mut self) -> FaultId {
        let id = FaultId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn insert(&mut self, record: WireRecord, device: Vec<FaultId>, granule: Granule, now: Instant) {
        self.counters.raised += 1;
        self.backlog.push_back(record.fault_id);
        self.pending.insert(
            record.fault_id,
            PendingFault {
                record,
                device_faults: device,
                granule,
                raised_at: now,
                written: false,
            },
        );
    }

    /// Writes deferred records, oldest first, until the ring is full.
    /// Returns how many were written.
    pub fn flush(&mut self, ring: &mut dyn FaultRing) -> usize {
        let mut written = 0;
        while let Some(id) = self.backlog.front().copied() {
            let Some(pending) = self.pending.get_mut(&id) else {
                self.backlog.pop_front();
                continue;
            };
            if !ring.push(&pending.record) {
                break;
            }
            pending.written = true;
            self.backlog.pop_front();
            written += 1;
        }
        written
    }

    /// Ends the guest fault `id` as the guest answered. Returns the device
    /// faults to end, or `None` if `id` is not pending.
    pub fn answer(&mut self, id: FaultId, answer: GuestAnswer) -> Option<Vec<FaultId>> {
        let pending = self.remove(id)?;
        self.round_trip
            .observe(Instant::now().saturating_duration_since(pending.raised_at));
        match answer {
            GuestAnswer::Resolved => self.counters.resolved += 1,
            GuestAnswer::Rejected => self.counters.rejected += 1,
        }
        Some(pending.device_faults)
    }

    /// Ends every guest fault raised before `now - timeout`; returns the
    /// device faults to cancel, with the VA of their guest fault.
    pub fn expire(&mut self, now: Instant) -> Vec<(GpuVa, FaultId)> {
        let expired: Vec<FaultId> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.raised_at) >= self.timeout)
            .map(|(id, _)| *id)
            .collect();
        let mut device = Vec::new();
        for id in expired {
            if let Some(p) = self.remove(id) {
                self.counters.timed_out += 1;
                device.extend(p.device_faults.into_iter().map(|d| (p.record.va, d)));
            }
        }
        device
    }

    /// Makes every pending guest fault unwritten again, so that the next
    /// [`FaultTracker::flush`] writes them all, oldest first, into a new
    /// ring (a guest kernel took the faults over, protocol 1.1). Their
    /// deadlines stay.
    pub fn repost_all(&mut self) {
        let mut ids: Vec<FaultId> = self.pending.keys().copied().collect();
        ids.sort_unstable();
        for id in &ids {
            if let Some(p) = self.pending.get_mut(id) {
                p.written = false;
            }
        }
        self.backlog = ids.into();
    }

    /// Ends every pending guest fault as rejected (nobody is left to
    /// answer them); returns their device faults.
    pub fn reject_all(&mut self) -> Vec<FaultId> {
        let ids: Vec<FaultId> = self.pending.keys().copied().collect();
        let mut device = Vec::new();
        for id in ids {
            if let Some(p) = self.remove(id) {
                self.counters.rejected += 1;
                device.extend(p.device_faults);
            }
        }
        device
    }

    /// Ends every pending guest fault (teardown); returns their device
    /// faults.
    pub fn cancel_all(&mut self) -> Vec<FaultId> {
        let ids: Vec<FaultId> = self.pending.keys().copied().collect();
        let mut device = Vec::new();
        for id in ids {
            if let Some(p) = self.remove(id) {
                self.counters.cancelled += 1;
                device.extend(p.device_faults);
            }
        }
        device
    }

    fn remove(&mut self, id: FaultId) -> Option<PendingFault> {
        let pending = self.pending.remove(&id)?;
        if self.by_granule.get(&pending.granule) == Some(&id) {
            self.by_granule.remove(&pending.granule);
        }
        if !pending.written {
            self.backlog.retain(|b| *b != id);
        }
        Some(pending)
    }
}

fn merge_access(record: &mut WireRecord, access: AccessFlags, merged: u32) {
    if let FaultCause::Access {
        access: a,
        merged: m,
        queue: _,
    } = &mut record.cause
    {
        *a = a.union(access);
        *m = m.saturating_add(merged.max(1));
    }
}

/// A queue id that no queue has: the `queue_id` of prefault records.
pub const NO_QUEUE: QueueId = QueueId(u32::MAX);

#[cfg(test)]
mod tests {
    use super::*;

    struct VecRing {
        records: Vec<WireRecord>,
        capacity: usize,
        dropped: u32,
    }

    impl FaultRing for VecRing {
        fn push(&mut self, record: &WireRecord) -> bool {
            if self.records.len() >= self.capacity {
                self.dropped += 1;
                return false;
            }
            self.records.push(*record);
            true
        }
    }

    fn dev(id: u64, va: u64, access: AccessFlags) -> DeviceFault {
        DeviceFault {
            id: FaultId(id),
            queue: QueueId(1),
            va: GpuVa(va),
            access,
            merged: 1,
        }
    }

    #[test]
    fn faults_in_one_granule_become_one_record() {
        let now = Instant::now();
        let mut t = FaultTracker::new(16, Duration::from_secs(1));
        t.add_device_fault(&dev(10, 0x20_0000, AccessFlags::READ), 21, now);
        t.add_device_fault(&dev(11, 0x20_1000, AccessFlags::WRITE), 21, now);
        t.add_device_fault(&dev(12, 0x40_0000, AccessFlags::READ), 21, now);
        let mut ring = VecRing {
            records: vec![],
            capacity: 8,
            dropped: 0,
        };
        assert_eq!(t.flush(&mut ring), 2);
        assert_eq!(ring.records[0].va, GpuVa(0x20_0000));
        assert_eq!(
            ring.records[0].cause,
            FaultCause::Access {
                queue: QueueId(1),
                access: AccessFlags::READ.union(AccessFlags::WRITE),
                merged: 2
            }
        );
        let ends = t
            .answer(ring.records[0].fault_id, GuestAnswer::Resolved)
            .unwrap();
        assert_eq!(ends, vec![FaultId(10), FaultId(11)]);
        assert_eq!(
            t.answer(ring.records[0].fault_id, GuestAnswer::Resolved),
            None
        );
        assert_eq!(t.counters().resolved, 1);
        assert_eq!(t.pending(), 1);
    }

    #[test]
    fn a_full_ring_defers_without_losing() {
        let now = Instant::now();
        let mut t = FaultTracker::new(16, Duration::from_secs(1));
        for i in 0..5u64 {
            t.add_device_fault(&dev(i, 0x10_0000 + i * 0x1000, AccessFlags::READ), 12, now);
        }
        let mut ring = VecRing {
            records: vec![],
            capacity: 2,
            dropped: 0,
        };
        assert_eq!(t.flush(&mut ring), 2);
        assert_eq!(ring.dropped, 1);
        assert_eq!(t.deferred(), 3);
        ring.records.clear();
        ring.capacity = 8;
        assert_eq!(t.flush(&mut ring), 3);
        let vas: Vec<u64> = ring.records.iter().map(|r| r.va.raw()).collect();
        assert_eq!(vas, vec![0x10_2000, 0x10_3000, 0x10_4000]);
        assert_eq!(t.counters().raised, 5);
    }

    #[test]
    fn deadlines_and_teardown_end_everything_once() {
        let start = Instant::now();
        let mut t = FaultTracker::new(16, Duration::from_millis(10));
        t.add_device_fault(&dev(1, 0x1000_0000, AccessFlags::READ), 12, start);
        t.add_device_fault(
            &dev(2, 0x2000_0000, AccessFlags::READ),
            12,
            start + Duration::from_millis(8),
        );
        let expired = t.expire(start + Duration::from_millis(12));
        assert_eq!(expired, vec![(GpuVa(0x1000_0000), FaultId(1))]);
        assert_eq!(t.cancel_all(), vec![FaultId(2)]);
        assert_eq!(t.pending(), 0);
        assert_eq!(t.deferred(), 0);
        let c = t.counters();
        assert_eq!((c.timed_out, c.cancelled), (1, 1));
    }

    #[test]
    fn reposting_writes_every_pending_fault_again_oldest_first() {
        let now = Instant::now();
        let mut t = FaultTracker::new(16, Duration::from_secs(1));
        for i in 0..4u64 {
            t.add_device_fault(&dev(i, 0x10_0000 + i * 0x1000, AccessFlags::READ), 12, now);
        }
        let mut ring = VecRing {
            records: vec![],
            capacity: 2,
            dropped: 0,
        };
        assert_eq!(t.flush(&mut ring), 2);
        let first = ring.records[0].fault_id;
        assert_eq!(
            t.answer(first, GuestAnswer::Resolved),
            Some(vec![FaultId(0)])
        );
        t.repost_all();
        let mut other = VecRing {
            records: vec![],
            capacity: 8,
            dropped: 0,
        };
        assert_eq!(t.flush(&mut other), 3, "the written and the deferred ones");
        let vas: Vec<u64> = other.records.iter().map(|r| r.va.raw()).collect();
        assert_eq!(vas, vec![0x10_1000, 0x10_2000, 0x10_3000]);
        assert_eq!(
            t.counters().raised,
            4,
            "a re-posted record is not counted twice"
        );
        assert_eq!(t.flush(&mut other), 0);
        let ends = t.reject_all();
        assert_eq!(ends.len(), 3);
        assert_eq!((t.pending(), t.deferred()), (0, 0));
        assert_eq!(t.counters().rejected, 3);
    }

    #[test]
    fn faults_that_time_out_before_their_record_is_written_were_raised() {
        let now = Instant::now();
        let mut t = FaultTracker::new(16, Duration::from_millis(10));
        for i in 0..6u64 {
            t.add_device_fault(&dev(i, 0x10_0000 + i * 0x1000, AccessFlags::READ), 12, now);
        }
        let mut ring = VecRing {
            records: vec![],
            capacity: 2,
            dropped: 0,
        };
        assert_eq!(t.flush(&mut ring), 2);
        assert_eq!(t.expire(now + Duration::from_millis(10)).len(), 6);
        let c = t.counters();
        assert_eq!((c.raised, c.timed_out), (6, 6));
        assert_eq!(t.deferred(), 0);
    }

    #[test]
    fn prefault_respects_the_cap_and_existing_faults() {
        let now = Instant::now();
        let mut t = FaultTracker::new(2, Duration::from_secs(1));
        t.add_device_fault(&dev(1, 0x3000, AccessFlags::READ), 12, now);
        assert!(!t.add_prefault(GpuVa(0x3000), 12, now));
        assert!(t.add_prefault(GpuVa(0x4000), 12, now));
        assert!(!t.add_prefault(GpuVa(0x5000), 12, now));
        let mut ring = VecRing {
            records: vec![],
            capacity: 8,
            dropped: 0,
        };
        t.flush(&mut ring);
        assert_eq!(ring.records[1].cause, FaultCause::Prefault);
        assert_eq!(
            t.answer(ring.records[1].fault_id, GuestAnswer::Resolved),
            Some(vec![])
        );
    }
}
