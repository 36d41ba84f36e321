//! User-mode queues (protocol 1.1, `USER_QUEUE_*`): SDMA and AQL rings in
//! this process's memory that the device reads through the GPU VM, with a
//! doorbell slot in the thunk's doorbell page and, for SDMA, read/write
//! pointers and a status block in a queue page the thunk allocates.
//!
//! When a queue stops (its status block says so), the thunk does what
//! KFD and the command processor do for ROCr: a fault stop becomes a
//! fatal `MemoryAccessFault` on the MEMORY events; an AQL packet the
//! device cannot run (`UNSUPPORTED_PACKET`, a kernel dispatch) sets the
//! queue's `queue_inactive_signal` in ROCr's `amd_queue_t` to an error
//! code and raises its event, so ROCr calls the queue's error callback.

use std::collections::BTreeMap;

use guest_proto::AccessFlags;
use guest_proto::capset::Capset;
use guest_proto::uq::{
    MAX_USER_RING_SIZE, MIN_USER_RING_SIZE, QUEUE_POINTER_ALIGN, QUEUE_STATE_STOPPED,
    QueueStatusBlock, QueueStopStatus, STATUS_BLOCK_ALIGN, STATUS_BLOCK_SIZE, STATUS_STATE_OFFSET,
    USER_RING_ALIGN, UserQueueKind,
};
use guest_runtime::session::{Session, SharedBuffer};

use crate::events::MemoryFault;
use crate::thunk::Thunk;
use crate::topology::GPU_NODE;
use crate::types::*;

/// Whether the device runs user queues of `kind` (protocol 1.1: the
/// `USER_QUEUES` feature bit and the kind's bit in `user_queue_kinds`).
pub fn device_runs(capset: &Capset, kind: UserQueueKind) -> bool {
    capset.version_minor >= 1 && capset.supports_user_queue(kind)
}

/// Whether the device offers user queues of any kind the thunk uses.
pub fn device_has_user_queues(capset: &Capset) -> bool {
    device_runs(capset, UserQueueKind::Sdma) || device_runs(capset, UserQueueKind::Aql)
}

/// Doorbells in the doorbell page.
pub const DOORBELL_SLOTS: usize = 512;

/// The queue error code ROCr's AQL error handler maps to
/// `HSA_STATUS_ERROR_ILLEGAL_INSTRUCTION` (`amd_aql_queue.cpp`): the
/// device cannot execute the kernel's gfx90a instructions.
pub const AQL_ERROR_ILLEGAL_INSTRUCTION: i64 = 0x4000_0000;
/// ... and `HSA_STATUS_ERROR_INVALID_PACKET_FORMAT` (a malformed packet).
pub const AQL_ERROR_INVALID_PACKET: i64 = 32;

/// Layout of the per-queue page the thunk allocates (the thunk's choice;
/// the status block inside it is the protocol's, 14.6).
pub mod page {
    /// Bytes of the page.
    pub const BYTES: u64 = guest_proto::PAGE_SIZE;
    /// SDMA read pointer (device writes).
    pub const RPTR: usize = 0;
    /// SDMA write pointer (ROCr writes).
    pub const WPTR: usize = 64;
    /// Queue status block (device writes when the queue stops).
    pub const STATUS: usize = 128;
}

const _: () = {
    assert!((page::STATUS as u64).is_multiple_of(STATUS_BLOCK_ALIGN));
    assert!(page::STATUS as u64 + STATUS_BLOCK_SIZE <= page::BYTES);
    assert!((page::RPTR as u64).is_multiple_of(QUEUE_POINTER_ALIGN));
    assert!((page::WPTR as u64).is_multiple_of(QUEUE_POINTER_ALIGN));
};

/// The kind of a user queue (the protocol's).
pub type Kind = UserQueueKind;

/// One user queue.
#[derive(Debug)]
pub struct UserQueue {
    /// The device's queue id.
    pub id: guest_proto::QueueId,
    /// SDMA or AQL.
    pub kind: Kind,
    /// rptr / wptr / status block.
    pub page: SharedBuffer,
    /// Its doorbell slot.
    pub doorbell: usize,
    /// AQL: ROCr's `amd_queue_t` (found from the read pointer).
    pub amd_queue: u64,
    /// Whether its stop was delivered.
    pub stopped: bool,
}

/// A stop to deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stop {
    /// SDMA or AQL.
    pub kind: Kind,
    /// The status block, or `None` if the device wrote one the codec
    /// refuses (a stop all the same).
    pub block: Option<QueueStatusBlock>,
    /// AQL: `amd_queue_t`.
    pub amd_queue: u64,
}

/// The user queues, by the handle ROCr holds (`QueueId`).
#[derive(Debug, Default)]
pub struct QueueTable {
    queues: BTreeMap<u64, UserQueue>,
    used: Vec<bool>,
    next: u64,
}

impl QueueTable {
    /// Inserts a queue; returns its handle.
    pub fn insert(&mut self, q: UserQueue) -> u64 {
        self.next += 1;
        self.queues.insert(self.next, q);
        self.next
    }

    /// Removes a queue.
    pub fn remove(&mut self, handle: u64) -> Option<UserQueue> {
        let q = self.queues.remove(&handle)?;
        if let Some(u) = self.used.get_mut(q.doorbell) {
            *u = false;
        }
        Some(q)
    }

    /// A free doorbell slot.
    pub fn take_doorbell(&mut self) -> Option<usize> {
        if self.used.is_empty() {
            self.used = vec![false; DOORBELL_SLOTS];
        }
        let i = self.used.iter().position(|u| !u)?;
        self.used[i] = true;
        Some(i)
    }

    /// Returns a slot taken by [`QueueTable::take_doorbell`].
    pub fn put_doorbell(&mut self, slot: usize) {
        if let Some(u) = self.used.get_mut(slot) {
            *u = false;
        }
    }

    /// Whether no queue exists.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Queues whose status block says stopped and whose stop was not yet
    /// delivered (each is delivered once).
    pub fn take_stopped(&mut self) -> Vec<Stop> {
        let mut out = Vec::new();
        for q in self.queues.values_mut() {
            if q.stopped {
                continue;
            }
            // `state` first, with acquire: the device writes it last.
            let state = q
                .page
                .map
                .load_u32(page::STATUS + STATUS_STATE_OFFSET as usize);
            if state != Some(QUEUE_STATE_STOPPED) {
                continue;
            }
            let mut bytes = [0u8; STATUS_BLOCK_SIZE as usize];
            let block = q.page.map.read(page::STATUS, &mut bytes).and_then(|_| {
                match QueueStatusBlock::decode(&bytes) {
                    Ok(b) => b,
                    Err(e) => {
                        crate::debug(|| format!("queue {:?}: status block: {e}", q.id));
                        None
                    }
                }
            });
            q.stopped = true;
            out.push(Stop {
                kind: q.kind,
                block,
                amd_queue: q.amd_queue,
            });
        }
        out
    }
}

/// The `HsaAccessAttributeFailure` bits for a fault stop.
pub fn failure_bits(status: QueueStopStatus, access: Option<AccessFlags>) -> u32 {
    // The device stops a queue on an unbound page (rejected / timed out)
    // or on a permission the range does not grant (fatal).
    let access = access.map_or(0, AccessFlags::bits);
    let fatal = status == QueueStopStatus::FaultFatal;
    if fatal && access & (AccessFlags::WRITE.bits() | AccessFlags::ATOMIC.bits()) != 0 {
        failure::READ_ONLY
    } else if fatal && access & AccessFlags::EXEC.bits() != 0 {
        failure::NO_EXECUTE
    } else {
        failure::NOT_PRESENT
    }
}

/// Delivers a stop; true if an event became signaled.
pub fn deliver_stop(thunk: &Thunk, stop: &Stop) -> bool {
    crate::debug(|| format!("queue stopped: {stop:x?}"));
    let status = stop.block.map(|b| b.status);
    match (status, stop.block) {
        (
            Some(
                s @ (QueueStopStatus::FaultRejected
                | QueueStopStatus::FaultTimedOut
                | QueueStopStatus::FaultFatal
                | QueueStopStatus::DeviceError),
            ),
            Some(b),
        ) => {
            thunk.events.lock().memory_fault(MemoryFault {
                node: GPU_NODE,
                va: b.fault_va.raw(),
                failure: failure_bits(s, b.access),
            });
            true
        }
        _ if stop.kind == Kind::Aql => {
            let code = if status == Some(QueueStopStatus::UnsupportedPacket) {
                AQL_ERROR_ILLEGAL_INSTRUCTION
            } else {
                AQL_ERROR_INVALID_PACKET
            };
            raise_queue_error(&thunk.events, stop.amd_queue, code)
        }
        _ => false,
    }
}

/// What the CP does when an AQL queue hits an error: store the error code
/// in the queue's `queue_inactive_signal` and raise that signal's event.
fn raise_queue_error(events: &crate::events::Events, amd_queue: u64, code: i64) -> bool {
    let Some(signal) = read_u64(amd_queue + amd_queue::QUEUE_INACTIVE_SIGNAL) else {
        return false;
    };
    if signal == 0 || signal % 8 != 0 {
        return false;
    }
    if !write_i64(signal + amd_signal::VALUE, code) {
        return false;
    }
    let event_id = read_u64(signal + amd_signal::EVENT_ID).map_or(0, |v| v as u32);
    events.lock().signal_id(event_id)
}

/// Reads a `u64` of this process's memory that ROCr owns, after checking
/// it is mapped readable (a hostile pointer must not crash the thunk).
fn read_u64(addr: u64) -> Option<u64> {
    if !addr.is_multiple_of(8) || !mapped(addr, false) {
        return None;
    }
    // SAFETY: `addr` is 8-aligned and lies in a readable mapping of this
    // process (checked above); ROCr's amd_queue_t/amd_signal_t live there
    // and are shared with the device, so an atomic load is the access.
    Some(unsafe {
        (*(addr as *const std::sync::atomic::AtomicU64)).load(std::sync::atomic::Ordering::Acquire)
    })
}

fn write_i64(addr: u64, v: i64) -> bool {
    if !addr.is_multiple_of(8) || !mapped(addr, true) {
        return false;
    }
    // SAFETY: as in `read_u64`, in a writable mapping; a release store as
    // a CP's signal write.
    unsafe {
        (*(addr as *const std::sync::atomic::AtomicI64))
            .store(v, std::sync::atomic::Ordering::Release)
    };
    true
}

fn mapped(addr: u64, write: bool) -> bool {
    matches!(guest_runtime::procmaps::lookup(addr), Ok(Some(m)) if m.read && (!write || m.write) && addr + 8 <= m.end)
}

/// `DOORBELL_KICK`.
pub fn kick(session: &mut Session) {
    crate::protocol_ext::doorbell_kick(session);
}

/// ROCr's queue priority (-3 ..= 3) as the device's (0 ..= 15).
pub fn queue_priority(p: HSA_QUEUE_PRIORITY) -> u8 {
    let max = u32::from(guest_proto::command::MAX_QUEUE_PRIORITY);
    let span = (HSA_QUEUE_PRIORITY_MAXIMUM - HSA_QUEUE_PRIORITY_MINIMUM) as u32;
    let steps = u32::try_from(p.saturating_sub(HSA_QUEUE_PRIORITY_MINIMUM))
        .unwrap_or(0)
        .min(span);
    u8::try_from(steps * max / span).unwrap_or(guest_proto::command::MAX_QUEUE_PRIORITY)
}

/// `hsaKmtCreateQueue`.
#[allow(clippy::too_many_arguments)]
pub fn create(
    thunk: &Thunk,
    node: u32,
    ty: HSA_QUEUE_TYPE,
    priority: HSA_QUEUE_PRIORITY,
    ring: u64,
    ring_size: u64,
    res: &mut HsaQueueResource,
) -> Result<(), HsakmtStatus> {
    if node != GPU_NODE {
        return Err(HSAKMT_STATUS_INVALID_NODE_UNIT);
    }
    if !(HSA_QUEUE_PRIORITY_MINIMUM..=HSA_QUEUE_PRIORITY_MAXIMUM).contains(&priority) {
        return Err(HSAKMT_STATUS_INVALID_PARAMETER);
    }
    let kind = match ty {
        HSA_QUEUE_SDMA | HSA_QUEUE_SDMA_XGMI => Kind::Sdma,
        HSA_QUEUE_COMPUTE_AQL => Kind::Aql,
        _ => return Err(HSAKMT_STATUS_NOT_SUPPORTED),
    };
    if !device_runs(&thunk.capset, kind) {
        return Err(HSAKMT_STATUS_NOT_SUPPORTED);
    }
    if ring == 0
        || !ring.is_multiple_of(USER_RING_ALIGN)
        || !ring_size.is_power_of_two()
        || !(MIN_USER_RING_SIZE..=MAX_USER_RING_SIZE).contains(&ring_size)
    {
        return Err(HSAKMT_STATUS_INVALID_PARAMETER);
    }
    let mut dev = thunk.dev();
    let slot = dev
        .queues
        .take_doorbell()
        .ok_or(HSAKMT_STATUS_OUT_OF_RESOURCES)?;
    let page_buf = match dev.session.alloc(page::BYTES) {
        Ok(b) => b,
        Err(e) => {
            crate::debug(|| format!("queue page: {e}"));
            dev.queues.put_doorbell(slot);
            return Err(HSAKMT_STATUS_NO_MEMORY);
        }
    };
    let base = page_buf.map.addr();
    let (rptr, wptr) = match kind {
        Kind::Sdma => (base + page::RPTR as u64, base + page::WPTR as u64),
        Kind::Aql => (res.QueueRptrValue, res.QueueWptrValue),
    };
    if rptr == 0 || rptr % QUEUE_POINTER_ALIGN != 0 || wptr % QUEUE_POINTER_ALIGN != 0 {
        dev.queues.put_doorbell(slot);
        dev.session.free(page_buf);
        return Err(HSAKMT_STATUS_INVALID_PARAMETER);
    }
    let doorbell = dev.doorbells.map.addr() + slot as u64 * 8;
    let _ = dev.doorbells.map.store_u64(slot * 8, 0);
    let spec = crate::protocol_ext::UserQueueSpec {
        kind,
        priority: queue_priority(priority),
        ring,
        ring_size,
        rptr,
        wptr,
        doorbell,
        status: base + page::STATUS as u64,
    };
    crate::debug(|| format!("USER_QUEUE_CREATE {spec:x?}"));
    let created = dev
        .session
        .map_buffer(&page_buf, base, guest_proto::Perms::RW)
        .map_err(|_| HSAKMT_STATUS_NO_MEMORY)
        .and_then(|_| crate::protocol_ext::user_queue_create(&mut dev.session, &spec));
    let id = match created {
        Ok(id) => id,
        Err(e) => {
            dev.queues.put_doorbell(slot);
            let _ = dev.session.unbind(base, page::BYTES);
            dev.session.free(page_buf);
            return Err(e);
        }
    };
    let amd_queue = match kind {
        Kind::Aql => rptr.wrapping_sub(amd_queue::READ_DISPATCH_ID),
        Kind::Sdma => 0,
    };
    let handle = dev.add_queue(UserQueue {
        id,
        kind,
        page: page_buf,
        doorbell: slot,
        amd_queue,
        stopped: false,
    });
    thunk
        .stats
        .user_queues
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    res.QueueId = handle;
    res.QueueDoorBell = doorbell;
    res.QueueRptrValue = rptr;
    res.QueueWptrValue = wptr;
    Ok(())
}

/// `hsaKmtDestroyQueue`.
pub fn destroy(thunk: &Thunk, handle: u64) -> Result<(), HsakmtStatus> {
    let mut dev = thunk.dev();
    let q = dev
        .queues
        .remove(handle)
        .ok_or(HSAKMT_STATUS_INVALID_PARAMETER)?;
    thunk
        .stats
        .user_queues
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    let r = crate::protocol_ext::user_queue_destroy(&mut dev.session, q.id);
    let base = q.page.map.addr();
    let _ = dev.session.unbind(base, page::BYTES);
    dev.session.free(q.page);
    r
}

/// `hsaKmtUpdateQueue`: the device has no per-queue percentage or
/// priority change; accepted for a live queue (what KFD does for a queue
/// whose properties it can keep), refused for an unknown one.
pub fn update(thunk: &Thunk, handle: u64) -> Result<(), HsakmtStatus> {
    let dev = thunk.dev();
    if dev.queues_contains(handle) {
        Ok(())
    } else {
        Err(HSAKMT_STATUS_INVALID_PARAMETER)
    }
}

impl crate::thunk::Dev {
    /// Whether `handle` is a live user queue.
    pub fn queues_contains(&self, handle: u64) -> bool {
        self.queues.contains(handle)
    }
}

impl QueueTable {
    /// Whether `handle` is live.
    pub fn contains(&self, handle: u64) -> bool {
        self.queues.contains_key(&handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_slots_are_reused_and_bounded() {
        let mut t = QueueTable::default();
        let slots: Vec<usize> = (0..DOORBELL_SLOTS)
            .map(|_| t.take_doorbell().unwrap())
            .collect();
        assert_eq!(slots[..3], [0, 1, 2]);
        assert_eq!(t.take_doorbell(), None, "page full");
        t.put_doorbell(7);
        assert_eq!(t.take_doorbell(), Some(7));
    }

    #[test]
    fn user_queues_are_detected_by_feature_bit_5_and_the_kind_bits() {
        use guest_proto::capset::Features;
        let mut c = Capset {
            features: Features::KERNEL_SVM,
            ..Capset::default()
        };
        assert!(
            !device_has_user_queues(&c),
            "bit 4 is KERNEL_SVM, not user queues"
        );
        c.features = Features::USER_QUEUES;
        assert!(device_runs(&c, UserQueueKind::Sdma));
        assert!(device_runs(&c, UserQueueKind::Aql));
        c.user_queue_kinds = UserQueueKind::Sdma.bit();
        assert!(device_runs(&c, UserQueueKind::Sdma));
        assert!(!device_runs(&c, UserQueueKind::Aql), "kind bit clear");
        c.user_queue_kinds = 0;
        assert!(!device_has_user_queues(&c));
        c.user_queue_kinds = guest_proto::uq::USER_QUEUE_KINDS_ALL;
        c.version_minor = 0;
        assert!(!device_has_user_queues(&c), "a 1.0 device");
    }

    #[test]
    fn rocr_priorities_span_the_device_range() {
        assert_eq!(queue_priority(HSA_QUEUE_PRIORITY_MINIMUM), 0);
        assert_eq!(queue_priority(0), 7);
        assert_eq!(
            queue_priority(HSA_QUEUE_PRIORITY_MAXIMUM),
            guest_proto::command::MAX_QUEUE_PRIORITY
        );
        assert_eq!(queue_priority(i32::MIN), 0);
        assert_eq!(queue_priority(i32::MAX), 15);
    }

    #[test]
    fn fault_stops_name_the_failure() {
        assert_eq!(
            failure_bits(QueueStopStatus::FaultRejected, Some(AccessFlags::READ)),
            failure::NOT_PRESENT
        );
        assert_eq!(
            failure_bits(QueueStopStatus::FaultRejected, Some(AccessFlags::WRITE)),
            failure::NOT_PRESENT,
            "an unbound page, whatever the access"
        );
        assert_eq!(
            failure_bits(QueueStopStatus::FaultFatal, Some(AccessFlags::WRITE)),
            failure::READ_ONLY
        );
        assert_eq!(
            failure_bits(QueueStopStatus::FaultFatal, Some(AccessFlags::ATOMIC)),
            failure::READ_ONLY
        );
        assert_eq!(
            failure_bits(QueueStopStatus::FaultFatal, Some(AccessFlags::EXEC)),
            failure::NO_EXECUTE
        );
        assert_eq!(
            failure_bits(QueueStopStatus::FaultFatal, None),
            failure::NOT_PRESENT
        );
    }

    fn table_with_one_queue() -> QueueTable {
        let map = guest_runtime::mmap::Mmap::anonymous(page::BYTES as usize).unwrap();
        let page = SharedBuffer {
            bo: guest_runtime::drm::Bo {
                handle: 0,
                res_id: 0,
            },
            map,
        };
        let mut t = QueueTable::default();
        t.insert(UserQueue {
            id: guest_proto::QueueId(3),
            kind: Kind::Aql,
            page,
            doorbell: 0,
            amd_queue: 0x1000,
            stopped: false,
        });
        t
    }

    #[test]
    fn a_stopped_status_block_is_delivered_once() {
        let mut t = table_with_one_queue();
        assert!(t.take_stopped().is_empty(), "running");
        let block = QueueStatusBlock {
            status: QueueStopStatus::UnsupportedPacket,
            fault_va: guest_proto::GpuVa(0),
            packet: 5,
            access: None,
            detail: 0x1402,
        };
        let bytes = block.encode();
        let write = |t: &QueueTable, off: usize, b: &[u8]| {
            let q = t.queues.values().next().unwrap();
            q.page.map.write(off, b).unwrap();
        };
        // As the device writes it: bytes 4.. first, `state` last.
        write(&t, page::STATUS + 4, &bytes[4..]);
        assert!(t.take_stopped().is_empty(), "state not written yet");
        write(&t, page::STATUS, &bytes[..4]);
        let stops = t.take_stopped();
        assert_eq!(
            stops,
            vec![Stop {
                kind: Kind::Aql,
                block: Some(block),
                amd_queue: 0x1000,
            }]
        );
        assert!(t.take_stopped().is_empty(), "delivered once");
    }

    #[test]
    fn a_status_block_the_codec_refuses_is_still_a_stop() {
        let mut t = table_with_one_queue();
        let q = t.queues.values().next().unwrap();
        q.page.map.store_u32(
            page::STATUS + guest_proto::uq::STATUS_STATUS_OFFSET as usize,
            99,
        );
        q.page.map.store_u32(page::STATUS, QUEUE_STATE_STOPPED);
        let stops = t.take_stopped();
        assert_eq!(stops.len(), 1);
        assert_eq!(stops[0].block, None, "status 99 is not defined");
    }

    #[test]
    fn an_aql_error_sets_the_inactive_signal_and_raises_its_event() {
        #[repr(C, align(64))]
        struct Mem([u64; 64]);
        let events = crate::events::Events::default();
        let h = events
            .lock()
            .create(
                &HsaEventDescriptor {
                    EventType: HSA_EVENTTYPE_SIGNAL,
                    NodeId: 0,
                    SyncVar: HsaSyncVar::default(),
                },
                false,
                false,
                0,
            )
            .unwrap();
        let id = events.lock().id_of(h).unwrap();
        let mut queue = Box::new(Mem([0; 64]));
        let mut signal = Box::new(Mem([0; 64]));
        let signal_addr = signal.0.as_mut_ptr() as u64;
        queue.0[(amd_queue::QUEUE_INACTIVE_SIGNAL / 8) as usize] = signal_addr;
        signal.0[(amd_signal::EVENT_ID / 8) as usize] = u64::from(id);
        let queue_addr = queue.0.as_mut_ptr() as u64;
        assert!(raise_queue_error(
            &events,
            queue_addr,
            AQL_ERROR_ILLEGAL_INSTRUCTION
        ));
        // SAFETY: reading our own box after the atomic store.
        let value = unsafe { std::ptr::read_volatile(&signal.0[1]) };
        assert_eq!(value, AQL_ERROR_ILLEGAL_INSTRUCTION as u64);
        assert!(events.lock().try_consume(&[id], false), "event raised");
        // A queue whose signal handle is garbage is left alone.
        queue.0[(amd_queue::QUEUE_INACTIVE_SIGNAL / 8) as usize] = 0x10;
        assert!(!raise_queue_error(&events, queue_addr, 1));
    }

    #[test]
    fn hostile_pointers_are_not_dereferenced() {
        assert_eq!(read_u64(0x1000), None, "unmapped");
        assert_eq!(read_u64(7), None, "misaligned");
        let v = Box::new(0x1234_u64);
        assert_eq!(read_u64(&*v as *const u64 as u64), Some(0x1234));
    }
}
